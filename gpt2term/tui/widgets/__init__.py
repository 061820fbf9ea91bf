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


class LaidOutOnce:
    """Mixin for a widget whose new size needs no second layout.

    After each layout Textual stores every resized widget's virtual size through a reactive that asks for another
    layout of the whole screen, so each growth of a streaming turn (its text, its turn, the transcript) laid the
    screen out twice. The size stored is the one that layout has just given the widget, and an anchored transcript
    is scrolled to its end within the same pass, so the second layout would change nothing; scrollbars that appear
    or go still ask for their own.
    """

    # Textual's private hook (`Widget._size_updated(size, virtual_size, container_size, layout=True)`); only its
    # `layout` argument is changed, so a later signature with more arguments still passes through.
    def _size_updated(self, *args, **kwargs) -> bool:
        if len(args) >= 4:
            args = (*args[:3], False, *args[4:])
        else:
            kwargs["layout"] = False
        return super()._size_updated(*args, **kwargs)  # type: ignore[misc]
