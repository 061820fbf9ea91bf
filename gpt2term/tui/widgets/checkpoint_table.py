"""The checkpoints table (one row per checkpoint in the store, sortable by any column) and the details panel."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from rich.text import Text
from textual.widgets import DataTable, Static

from gpt2term.core.metrics import perplexity
from gpt2term.core.store.locks import LockHolder
from gpt2term.core.store.store import CheckpointInfo
from gpt2term.formatting import format_bytes, format_count, format_time

# (column key, header, value used for sorting)
COLUMNS: tuple[tuple[str, str, Callable[[CheckpointInfo], Any]], ...] = (
    ("name", "name", lambda r: r.name.lower()),
    ("parameters", "params", lambda r: r.get("parameters")),
    ("step", "step", lambda r: r.get("step")),
    ("tokens_seen", "tokens", lambda r: r.get("tokens_seen")),
    ("val_loss", "val loss", lambda r: r.get("val_loss")),
    ("size", "size", lambda r: r.size_bytes),
    ("updated", "updated", lambda r: r.updated or ""),
    ("source", "source", lambda r: r.damaged or str(r.get("source") or "")),
)
NEWEST_FIRST = {"updated", "step", "tokens_seen", "parameters", "size"}  # first click sorts these descending
# When the table is too narrow for every column, these leave first (the details panel shows them all); a column is
# left out whole, never cut, and what is left of a long source is cut with an ellipsis.
DROP_FIRST = ("tokens_seen", "size", "parameters", "updated", "step")
SOURCE_ROOM = 24  # the source column's room when columns are chosen ("imported from Hugging Face gpt2" reads whole)


def _number(value: Any, fmt: Callable[[float], str]) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "-"
    return fmt(value)


def cells(row: CheckpointInfo) -> list[Text]:
    if row.damaged:
        cells_ = [Text(row.name, style="bold red")] + [Text("-", style="dim")] * 4
        cells_ += [Text(format_bytes(row.size_bytes)), Text(format_time(row.updated))]
        return [*cells_, Text(f"damaged: {row.damaged}", style="red")]
    return [
        Text(row.name, style="bold"),
        Text(_number(row.get("parameters"), format_count), justify="right"),
        Text(_number(row.get("step"), lambda v: f"{int(v):,}"), justify="right"),
        Text(_number(row.get("tokens_seen"), format_count), justify="right"),
        Text(_number(row.get("val_loss"), lambda v: f"{v:.3f}"), justify="right"),
        Text(format_bytes(row.size_bytes), justify="right"),
        Text(format_time(row.updated)),
        Text(str(row.get("source") or "-"), style="dim"),
    ]


class CheckpointTable(DataTable):
    """Rows keyed by checkpoint name; `show()` keeps the selection and the sort across refreshes."""

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.rows_by_name: dict[str, CheckpointInfo] = {}
        self.sort_column = "updated"
        self.sort_reverse = True

        self.shown_columns = [key for key, _, _ in COLUMNS]
        self._filled_width = 0

    def on_mount(self) -> None:
        for key, header, _ in COLUMNS:
            self.add_column(header, key=key)

    def on_resize(self) -> None:
        if self.size.width != self._filled_width and self.rows_by_name:
            self._fill(self.selected_name)

    def _choose_columns(self, rows: list[list[Text]]) -> tuple[list[str], int | None]:
        """The columns that fit the width whole, and the cells the source column may take (None: all it needs)."""
        keys = [key for key, _, _ in COLUMNS]
        room = self.scrollable_content_region.width - 1  # a vertical scrollbar may come
        if room <= 0:
            return keys, None
        pad = 2 * self.cell_padding
        widths = {key: len(header) + 2 for key, header, _ in COLUMNS}  # +2: the sort arrow
        for cells_ in rows:
            for (key, _, _), cell in zip(COLUMNS, cells_, strict=True):
                widths[key] = max(widths[key], cell.cell_len)
        need = dict(widths, source=min(widths["source"], SOURCE_ROOM))  # a longer source is cut, not a column
        for drop in DROP_FIRST:
            if sum(need[k] + pad for k in keys) <= room:
                break
            keys.remove(drop)
        left = room - sum(widths[k] + pad for k in keys if k != "source") - pad
        return keys, None if left >= widths["source"] else max(len("source") + 2, left)

    @property
    def selected_name(self) -> str | None:
        if not self.row_count:
            return None
        try:
            return str(self.coordinate_to_cell_key(self.cursor_coordinate).row_key.value)
        except Exception:  # no valid cursor
            return None

    @property
    def names(self) -> list[str]:
        """The names in the order shown."""
        return [str(key.value) for key in self.rows]

    def show(self, rows: list[CheckpointInfo], select: str | None = None) -> None:
        select = select or self.selected_name
        self.rows_by_name = {row.name: row for row in rows}
        self._fill(select)

    def sort_by(self, column: str, reverse: bool | None = None) -> None:
        if reverse is None:
            reverse = (not self.sort_reverse) if column == self.sort_column else column in NEWEST_FIRST
        self.sort_column, self.sort_reverse = column, reverse
        self._fill(self.selected_name)

    def next_sort(self) -> None:
        keys = [key for key, _, _ in COLUMNS if key in self.shown_columns] or [key for key, _, _ in COLUMNS]
        if self.sort_column not in keys:
            keys.append(self.sort_column)
        self.sort_by(keys[(keys.index(self.sort_column) + 1) % len(keys)])

    def _fill(self, select: str | None) -> None:
        value_of = dict((key, fn) for key, _, fn in COLUMNS)[self.sort_column]

        def order(row: CheckpointInfo) -> tuple:
            value = value_of(row)
            missing = value is None or (isinstance(value, float) and math.isnan(value))
            # Missing values go last whatever the direction.
            return (missing != self.sort_reverse, 0 if missing else value, row.name.lower())

        rows = sorted(self.rows_by_name.values(), key=order, reverse=self.sort_reverse)
        all_cells = [cells(row) for row in rows]
        self.shown_columns, source_width = self._choose_columns(all_cells)
        self._filled_width = self.size.width
        self.clear(columns=True)
        for key, header, _ in COLUMNS:
            if key in self.shown_columns:
                arrow = (" ▼" if self.sort_reverse else " ▲") if key == self.sort_column else ""
                self.add_column(Text(header + arrow), key=key)
        for row, row_cells in zip(rows, all_cells, strict=True):
            shown = [cell for (key, _, _), cell in zip(COLUMNS, row_cells, strict=True) if key in self.shown_columns]
            if source_width is not None and shown[-1].cell_len > source_width:
                shown[-1] = shown[-1].copy()
                shown[-1].truncate(source_width, overflow="ellipsis")
            self.add_row(*shown, key=row.name)
        if select in self.rows_by_name:
            self.move_cursor(row=self.get_row_index(select))


def describe(row: CheckpointInfo | None, writer: LockHolder | None = None) -> Text:
    """The details panel: what the checkpoint is, how far it trained, where it came from."""
    text = Text()
    if row is None:
        text.append("No checkpoint selected.\n\n", style="bold")
        text.append("Train one in the Train mode, or import weights (i): a Hugging Face GPT-2, the book's .pth.")
        return text
    text.append(row.name + "\n", style="bold")
    if writer is not None:
        what = f" ({writer.purpose})" if writer.purpose else ""
        text.append(f"being written by process {writer.pid}{what}\n", style="green")
    if row.damaged:
        text.append(f"damaged: {row.damaged}\n", style="bold red")
    cfg = row.config
    if cfg is not None:
        text.append("config  ", style="dim")
        text.append(
            f"{cfg.n_layers} layers · {cfg.emb_dim} dims · {cfg.n_heads} heads · context {cfg.context_length} · "
            f"vocab {cfg.vocab_size:,} · dropout {cfg.drop_rate:g} · qkv bias {'on' if cfg.qkv_bias else 'off'}\n"
        )
    params = row.get("parameters")
    if isinstance(params, int):
        text.append("params  ", style="dim")
        text.append(f"{params:,}\n")
    step = row.get("step")
    if isinstance(step, int):
        text.append("trained ", style="dim")
        text.append(f"{step:,} steps · {format_count(row.get('tokens_seen') or 0)} tokens\n")
    losses = []
    for split in ("train", "val"):
        loss = row.get(f"{split}_loss")
        if isinstance(loss, int | float):
            ppl = row.get(f"{split}_perplexity") or perplexity(loss)
            losses.append(f"{split} {loss:.3f} (ppl {ppl:,.1f})")
    if losses:
        text.append("loss    ", style="dim")
        text.append(" · ".join(losses) + "\n")
    text.append("source  ", style="dim")
    text.append(f"{row.get('source') or 'unknown'}")
    if row.get("copied_from"):
        text.append(f" (copied from {row.get('copied_from')})")
    text.append("\n")
    training = row.get("training")
    if isinstance(training, dict):
        corpus = " ".join(training.get("corpus") or []) or "pydoc"
        text.append("run     ", style="dim")
        text.append(f"corpus {corpus} · batch {training.get('batch_size')} · lr {training.get('lr')} · ")
        text.append("resumable (t)\n" if row.has_optimizer else "no optimizer state\n")
    text.append("dates   ", style="dim")
    text.append(f"created {format_time(row.get('created'))} · updated {format_time(row.updated)}\n")
    text.append("folder  ", style="dim")
    text.append(f"{row.path} ({format_bytes(row.size_bytes)})\n")
    return text


class CheckpointDetails(Static):
    DEFAULT_CSS = "CheckpointDetails { height: auto; }"
