"""Widgets of the prompt screen: header, prompt input, token stream, probability and perplexity panels."""

from __future__ import annotations

from textual.visual import VisualType
from textual.widget import Widget
from textual.widgets import Static


def refresh_in_place(widget: Widget) -> None:
    """Repaint `widget` after its content changed, laying the screen out again only if its height changed: a
    layout repaints every widget on the screen, and while tokens stream in that is the decoder's time."""
    widget.refresh()  # first: it drops the cached render, which the measure below would otherwise take as current
    rule = widget.styles.height
    if rule is not None and not rule.is_auto:  # a fixed or fractional height does not follow the content
        return
    size = widget.content_size
    height = widget.get_content_height(size, widget.screen.size, size.width) if size.width else None
    if height != size.height:
        widget.refresh(layout=True)


def update_in_place(static: Static, content: VisualType) -> None:
    """`Static.update`, laying the screen out again only if the new content changes the widget's height."""
    static.update(content, layout=False)
    refresh_in_place(static)
