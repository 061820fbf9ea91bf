"""The footer, fitted to the width: Textual's Footer lays every shown binding in one row and lets the last ones fall
off the right edge (cut mid-word); this one leaves out the least needed bindings whole until the rest fit. Every
binding is in the command palette anyway (the palette key stays on the right), so nothing is lost, only moved."""

from __future__ import annotations

from rich.cells import cell_len
from textual import events
from textual.app import ComposeResult
from textual.widgets import Footer
from textual.widgets._footer import FooterKey

# What a newcomer needs first, most needed first; a binding not listed comes after these. When the row is too wide,
# bindings leave from the end of this order.
FOOTER_FIRST = (
    "app.quit",
    "prompt.stop",
    "prompt.back",
    "prompt.settings",
    "prompt.inspect",
    "tokens.attention",
    "tokens.lens",
    "prompt.compare",
    "prompt.save",
    "prompt.toggle-colours",
    "prompt.toggle-boundaries",
    "prompt.versus",
    "prompt.copy",
    "train.start",
    "train.pause",
    "train.resume",
    "train.stop",
    "train.unfollow",
    "train.save",
    "train.prompt",
    "train.follow",
    "checkpoints.load",
    "checkpoints.train",
    "checkpoints.import",
    "checkpoints.export",
    "checkpoints.rename",
    "checkpoints.copy",
    "checkpoints.delete",
    "checkpoints.follow",
    "checkpoints.sort",
    "checkpoints.refresh",
)


def key_width(key: FooterKey) -> int:
    """Cells one compact footer key takes: its key, a space, its description, and the margin after it."""
    return cell_len(key.key_display) + (1 + cell_len(key.description) if key.description else 0) + 1


class FittedFooter(Footer):
    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("compact", True)
        super().__init__(**kwargs)
        self._fitted_width = 0
        self.left_out: list[str] = []  # the binding ids that did not fit (in the palette only)

    def compose(self) -> ComposeResult:
        widgets = list(super().compose())  # flat: none of our bindings has a group
        width = self.size.width or self.app.size.width
        self._fitted_width = width
        palette = [w for w in widgets if w.has_class("-command-palette")]
        keys = [w for w in widgets if isinstance(w, FooterKey) and w not in palette]
        ids = {binding.action: binding.id for _, binding, _, _ in self.screen.active_bindings.values()}

        def rank(key: FooterKey) -> int:
            binding_id = ids.get(key.action)
            return FOOTER_FIRST.index(binding_id) if binding_id in FOOTER_FIRST else len(FOOTER_FIRST)

        room = width - sum(key_width(key) + 1 for key in palette)  # the palette key has a border on its left
        kept = list(keys)
        self.left_out = []
        for key in sorted(keys, key=rank, reverse=True):
            if sum(map(key_width, kept)) <= room:
                break
            kept.remove(key)
            self.left_out.append(ids.get(key.action) or key.action)
        yield from kept
        yield from palette

    def on_resize(self, event: events.Resize) -> None:
        if event.size.width != self._fitted_width and self._bindings_ready:
            self.call_after_refresh(self.recompose)
