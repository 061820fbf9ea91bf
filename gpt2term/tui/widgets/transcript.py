"""The conversation: each prompt followed by its completion, streamed token by token.

Each turn is its own widget, and a new token only appends to the last turn's cached text, so streaming never
re-renders the earlier turns. The view is anchored to the bottom (Textual's `anchor`): it follows new tokens until
the user scrolls up, and follows again once they scroll back down.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.containers import Vertical, VerticalScroll
from textual.geometry import Size
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Static

from gpt2term.core.generation import Step
from gpt2term.tui.keymap import bind
from gpt2term.tui.turns import Turn, stats_line
from gpt2term.tui.widgets import LaidOutOnce, refresh_in_place, update_in_place
from gpt2term.tui.widgets.colors import prob_color

_BOUNDARY_BG = ("#1f3d5c", "#533a5e")  # alternate backgrounds make each token's extent visible


@dataclass(frozen=True)
class TokenDisplay:
    colours: bool = False
    boundaries: bool = False


def token_piece(step: Step, index: int, display: TokenDisplay, selected: bool) -> tuple[str, str]:
    """The text and style one generated token gets on screen."""
    if display.boundaries:
        text = step.token_text.replace("\n", "↵\n")
        if not text:
            text = "∅"
    else:
        text = step.text
        if selected and not text.strip():
            text = text + "▯" if "\n" not in text else "▯" + text  # a selected space or byte must stay visible
    styles = []
    if display.colours:
        styles.append(prob_color(step.prob))
    if display.boundaries:
        styles.append(f"on {_BOUNDARY_BG[index % 2]}")
    if selected:
        styles.append("reverse bold")
    return text, " ".join(styles)


STREAM_ROOM = 4  # lines the text of a generating turn grows by at a time (blank until its tokens fill them)


class TokenText(LaidOutOnce, Widget):
    """Prompt and completion of one turn as one wrapped text; tokens are appended to a cached `Text`."""

    DEFAULT_CSS = "TokenText { height: auto; }"

    def __init__(self, turn: Turn, display: TokenDisplay) -> None:
        super().__init__()
        self.turn = turn
        self.display_mode = display
        self.selected: int | None = None
        self._text: Text | None = None
        self._rendered_steps = 0

    def _build(self) -> Text:
        text = self._prompt()
        for index, step in enumerate(self.turn.steps):
            text.append(*token_piece(step, self._parity + index, self.display_mode, index == self.selected))
        self._rendered_steps = len(self.turn.steps)
        return text

    def render(self) -> Text:
        if self._text is None:
            self._text = self._build()
        for index in range(self._rendered_steps, len(self.turn.steps)):  # only the new tokens
            step = self.turn.steps[index]
            self._text.append(*token_piece(step, self._parity + index, self.display_mode, index == self.selected))
        self._rendered_steps = len(self.turn.steps)
        return self._text

    @property
    def _parity(self) -> int:
        """Generated tokens continue the prompt's alternation of backgrounds, so the first one stands out too."""
        return len(self.turn.prompt_ids)

    def _prompt(self) -> Text:
        """The prompt in bold; with boundaries shown, as the tokens the model read (a prompt longer than the
        context: its last tokens, after an ellipsis)."""
        if not self.display_mode.boundaries:
            return Text(self.turn.prompt, style="bold")
        tokenizer = self.app.tokenizer
        text = Text()
        if tokenizer.decode(self.turn.prompt_ids) != self.turn.prompt:
            text.append("…", style="bold dim")
        for index, token_id in enumerate(self.turn.prompt_ids):
            piece = tokenizer.token_text(token_id).replace("\n", "↵\n") or "∅"
            text.append(piece, style=f"bold on {_BOUNDARY_BG[index % 2]}")
        return text

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        """While tokens stream in, the height grows `STREAM_ROOM` lines at a time: each growth lays out the whole
        screen (twice: the new size is a change too), and one per wrapped line would take the decoder's time."""
        height = super().get_content_height(container, viewport, width)
        if self.turn.state != "generating":
            return height
        return -(-height // STREAM_ROOM) * STREAM_ROOM

    def tokens_added(self) -> None:
        refresh_in_place(self)

    def restyle(self, display: TokenDisplay | None = None, selected: int | None = -1) -> None:
        """Re-render after a toggle or a cursor move (selected=-1: keep the current selection)."""
        if display is not None:
            self.display_mode = display
        if selected != -1:
            self.selected = selected
        self._text = None
        self.refresh(layout=True)

    @property
    def plain(self) -> str:
        """What the screen shows for this turn, as plain text."""
        return self.render().plain


class TurnStats(LaidOutOnce, Static):
    """A turn's stats line: tokens, speed, perplexity (it wraps on a narrow screen)."""


class TurnView(LaidOutOnce, Vertical):
    DEFAULT_CSS = """
    TurnView { height: auto; margin-bottom: 1; }
    TurnView .turn-stats { color: $text-muted; height: auto; }
    """

    def __init__(self, turn: Turn, display: TokenDisplay) -> None:
        super().__init__(id=f"turn-{turn.id}")
        self.turn = turn
        self.body = TokenText(turn, display)
        self.stats = TurnStats(stats_line(turn), classes="turn-stats", markup=False)

    def compose(self):
        yield self.body
        yield self.stats

    def tokens_added(self) -> None:
        self.body.tokens_added()

    def update_stats(self) -> None:
        update_in_place(self.stats, stats_line(self.turn))
        if self.turn.state != "generating":  # while it streams, `tokens_added` has just measured the text
            refresh_in_place(self.body)  # a finished turn gives back the room it kept for its next lines


class Transcript(LaidOutOnce, VerticalScroll, can_focus=True):
    """The scrolling conversation, and a keyboard cursor over generated tokens (focus it with Tab)."""

    BINDINGS = [
        bind("tokens.previous", "move_cursor(-1)", show=False),
        bind("tokens.next", "move_cursor(1)", show=False),
        bind("tokens.first", "cursor_edge('first')", show=False),
        bind("tokens.last", "cursor_edge('last')", show=False),
    ]

    class Selected(Message):
        """The token cursor moved: `index` is None when it follows the latest token."""

        def __init__(self, turn: Turn | None, index: int | None) -> None:
            super().__init__()
            self.turn = turn
            self.index = index

    def __init__(self, empty_hint: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        self.turns: list[Turn] = []
        self.views: dict[int, TurnView] = {}
        self.display_mode = TokenDisplay()
        self.cursor: tuple[int, int] | None = None  # (position in self.turns, token index); None follows the end
        self._hint = Static(empty_hint, id="transcript-hint", markup=False)

    def compose(self):
        yield self._hint

    def on_mount(self) -> None:
        self.anchor()

    def set_hint(self, text: str) -> None:
        self._hint.update(text)
        self._hint.display = not self.turns and bool(text)

    def add_turn(self, turn: Turn) -> TurnView:
        self._hint.display = False
        self.turns.append(turn)
        view = TurnView(turn, self.display_mode)
        self.views[turn.id] = view
        self.mount(view)
        self._clear_cursor()
        return view

    def tokens_added(self, turn: Turn) -> None:
        self.views[turn.id].tokens_added()

    def update_stats(self, turn: Turn) -> None:
        self.views[turn.id].update_stats()

    def set_display(self, display: TokenDisplay) -> None:
        self.display_mode = display
        for view in self.views.values():
            view.body.restyle(display)

    # ------------------------------------------------------------------ token cursor

    def _clear_cursor(self) -> None:
        if self.cursor is not None:
            old = self.turns[self.cursor[0]]
            self.views[old.id].body.restyle(selected=None)
        self.cursor = None

    def _select(self, position: int, index: int) -> None:
        self._clear_cursor()
        self.cursor = (position, index)
        turn = self.turns[position]
        view = self.views[turn.id]
        view.body.restyle(selected=index)
        self.scroll_to_widget(view, animate=False)
        self.post_message(self.Selected(turn, index))

    def _flat_positions(self) -> list[tuple[int, int]]:
        return [(p, i) for p, turn in enumerate(self.turns) for i in range(len(turn.steps))]

    def action_move_cursor(self, delta: int) -> None:
        positions = self._flat_positions()
        if not positions:
            self.app.bell()
            return
        if self.cursor is None:
            target = len(positions) - 1
        else:
            target = max(0, min(len(positions) - 1, positions.index(self.cursor) + delta))
        self._select(*positions[target])

    def action_cursor_edge(self, edge: str) -> None:
        if not self.turns:
            return
        position = self.cursor[0] if self.cursor is not None else len(self.turns) - 1
        steps = len(self.turns[position].steps)
        if steps:
            self._select(position, 0 if edge == "first" else steps - 1)

    def follow_latest(self) -> None:
        """Let the panels follow the newest token again (the cursor is dropped)."""
        self._clear_cursor()
        self.post_message(self.Selected(None, None))

    @property
    def selected_turn_and_index(self) -> tuple[Turn | None, int | None]:
        if self.cursor is None:
            return None, None
        return self.turns[self.cursor[0]], self.cursor[1]
