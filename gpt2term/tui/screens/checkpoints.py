"""The checkpoints screen: every model in the store, what it is, and what to do with it.

Everything it changes goes through `CheckpointStore` (atomic renames, copies and deletes, refused while a run
writes the checkpoint) and `interop` (exports): a failure is a notification, and the store is left as it was.
Slow operations (import, export, copy) run in a thread worker; the table is read again when they finish.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from textual import getters, on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable
from textual.worker import Worker

from gpt2term.core.errors import Gpt2termError
from gpt2term.core.interop import find_hf_cached_models
from gpt2term.core.store.store import CheckpointInfo, CheckpointStore
from gpt2term.formatting import format_bytes
from gpt2term.tui.dialogs import (
    ConfirmScreen,
    ExportRequest,
    ExportScreen,
    ImportRequest,
    ImportScreen,
    NameScreen,
)
from gpt2term.tui.keymap import bind, key_display
from gpt2term.tui.messages import StoreListed, StoreOperationDone
from gpt2term.tui.run_state import Series
from gpt2term.tui.widgets.checkpoint_table import COLUMNS, CheckpointDetails, CheckpointTable, describe
from gpt2term.tui.widgets.footer import FittedFooter
from gpt2term.tui.widgets.header import ModelHeader
from gpt2term.tui.widgets.train_form import resumable
from gpt2term.tui.widgets.training_charts import LossPlot
from gpt2term.tui.workers import WorkerErrors

if TYPE_CHECKING:
    from gpt2term.tui.app import Gpt2termApp


def loss_history(records: list[dict]) -> tuple[Series, Series]:
    """Training loss (every step) and validation loss (every evaluation) from a run's metrics.jsonl records."""
    train, val = Series(), Series()
    for record in records:
        try:
            if record.get("type") == "step":
                train.add(int(record["step"]), float(record["loss"]))
            elif record.get("type") == "eval":
                val.add(int(record["step"]), float(record["val_loss"]))
        except (KeyError, TypeError, ValueError, OverflowError):  # int(1e309): the store skips such lines already
            continue
    return train, val


class CheckpointsScreen(WorkerErrors, Screen):
    BINDINGS = [
        bind("checkpoints.load", "load"),
        bind("checkpoints.train", "train"),
        bind("checkpoints.rename", "rename"),
        bind("checkpoints.copy", "copy"),
        bind("checkpoints.delete", "delete"),
        bind("checkpoints.export", "export"),
        bind("checkpoints.import", "import"),
        bind("checkpoints.follow", "follow"),
        bind("checkpoints.sort", "sort"),
        bind("checkpoints.refresh", "refresh"),
        bind("checkpoints.surface", "surface"),
        bind("checkpoints.loss", "loss"),
    ]

    if TYPE_CHECKING:
        app = getters.app(Gpt2termApp)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.store = CheckpointStore()
        self._history_cache: dict[str, tuple[tuple[int, int], tuple[Series, Series]]] = {}
        self.listed = False  # the table shows the store (it is read in a worker)
        self._list_requests = 0  # listings asked for: only the newest is shown (see `on_store_listed`)
        self._select_after_listing: str | None = None

    def compose(self) -> ComposeResult:
        yield ModelHeader("checkpoints")
        with Vertical(id="ckpt-body"):
            yield CheckpointTable(id="ckpt-table")
            with Horizontal(id="ckpt-bottom"):
                with VerticalScroll(id="ckpt-details-box"):
                    yield CheckpointDetails(id="ckpt-details")
                yield LossPlot("loss history", id="ckpt-plot")
        yield FittedFooter()

    @property
    def table(self) -> CheckpointTable:
        return self.query_one(CheckpointTable)

    def on_mount(self) -> None:
        self.query_one("#ckpt-details-box").border_title = "details"
        self.table.border_title = "checkpoints"
        self.table.focus()

    def on_screen_resume(self) -> None:
        self.reload()

    def reload(self, select: str | None = None) -> None:
        """Read the store again (other processes and the train screen change it), in a worker: listing it may
        first repair a save that crashed, which is disk work the UI must not wait on."""
        self._list_requests += 1
        if select is not None:
            self._select_after_listing = select
        self._list_store(self._list_requests)

    @work(thread=True, exclusive=True, exit_on_error=False, group="list")
    def _list_store(self, request: int) -> None:
        self.post_message(StoreListed(self.store.list(), request=request))

    def on_store_listed(self, message: StoreListed) -> None:
        if message.request != self._list_requests:
            # An older listing than one asked for since: its thread may have read the store before a rename or a
            # copy and finished after the newer one, and showing it would undo what the table just showed.
            return
        rows = message.rows
        self.listed = True
        self.table.show(rows, self._select_after_listing)
        self._select_after_listing = None
        total = sum(row.size_bytes for row in rows)
        self.table.border_title = f"checkpoints ({len(rows)}, {format_bytes(total)})"
        self.table.border_subtitle = str(self.store.root)
        self.show_details()

    @property
    def selected(self) -> CheckpointInfo | None:
        name = self.table.selected_name
        return self.table.rows_by_name.get(name) if name else None

    @on(DataTable.RowHighlighted)
    def _highlighted(self) -> None:
        self.show_details()

    @on(DataTable.RowSelected)
    def _selected(self) -> None:
        self.action_load()

    @on(DataTable.HeaderSelected)
    def _header(self, event: DataTable.HeaderSelected) -> None:
        self.table.sort_by(str(event.column_key.value))

    def show_details(self) -> None:
        row = self.selected
        writer = self.store.lock_holder(row.name) if row is not None else None
        self.query_one(CheckpointDetails).update(describe(row, writer))
        train, val = self._history(row.name) if row is not None else (Series(), Series())
        plot = self.query_one(LossPlot)
        plot.title = f"{row.name}: loss" if row is not None else "loss history"
        plot.show(train, val)

    def _history(self, name: str) -> tuple[Series, Series]:
        """Loss curves from metrics.jsonl, read again only when the file changed."""
        path = self.store.metrics_path(name)
        try:
            stat = path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            return Series(), Series()
        cached = self._history_cache.get(name)
        if cached is None or cached[0] != stamp:
            cached = (stamp, loss_history(self.store.read_metrics(name)))
            self._history_cache[name] = cached
        return cached[1]

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("load", "train", "rename", "copy", "delete", "export", "follow", "surface", "loss"):
            return self.table.row_count > 0  # the footer shows only what can be done
        return True

    def _require_selected(self, *, loadable: bool = True) -> CheckpointInfo | None:
        row = self.selected
        if row is None:
            self.notify(
                f"No checkpoint yet: train one (F3) or import weights ({key_display(self.app, 'checkpoints.import')}).",
                severity="warning",
            )
            return None
        if loadable and row.damaged:
            self.notify(f"{row.name} is damaged: {row.damaged}", severity="error", timeout=10)
            return None
        return row

    # ------------------------------------------------------------------ actions

    def action_load(self) -> None:
        row = self._require_selected()
        if row is not None:
            self.app.open_in_prompt(row.name)

    def action_train(self) -> None:
        row = self._require_selected()
        if row is not None:
            kind = "resume" if resumable(row) else "from"
            self.app.open_train(kind, row.name)

    def action_follow(self) -> None:
        row = self._require_selected(loadable=False)
        if row is None:
            return
        if not self.store.metrics_path(row.name).is_file():
            self.notify(f"{row.name} has no metrics.jsonl: it was not made by a training run.", severity="warning")
            return
        self.app.open_train("follow", row.name)

    def action_rename(self) -> None:
        row = self._require_selected(loadable=False)
        if row is None:
            return

        def rename(new: str | None) -> None:
            if new and new != row.name:
                self._run(lambda: self.store.rename(row.name, new), "Renaming…", f"Renamed {row.name} to {new}.", new)

        taken = set(self.table.rows_by_name)
        self.app.push_screen(NameScreen(f"Rename {row.name}", "New name", row.name, taken - {row.name}), rename)

    def action_copy(self) -> None:
        row = self._require_selected()
        if row is None:
            return

        def copy(new: str | None) -> None:
            if new:
                self._run(lambda: self.store.copy(row.name, new), "Copying…", f"Copied {row.name} to {new}.", new)

        taken = set(self.table.rows_by_name)
        self.app.push_screen(NameScreen(f"Copy {row.name}", "Name of the copy", f"{row.name}-copy", taken), copy)

    def action_delete(self) -> None:
        row = self._require_selected(loadable=False)
        if row is None:
            return

        def delete(yes: bool | None) -> None:
            if yes:
                self._run(lambda: self.store.delete(row.name), "Deleting…", f"Deleted {row.name}.")

        question = (
            f"Delete checkpoint {row.name!r} ({format_bytes(row.size_bytes)}: weights, training state and "
            f"metrics)?\nIt cannot be undone.\n\n{row.path}"
        )
        self.app.push_screen(ConfirmScreen("Delete", question, "Delete", "Keep", danger=True), delete)

    def action_export(self) -> None:
        row = self._require_selected()
        if row is None:
            return

        def export(request: ExportRequest | None) -> None:
            if request is not None:
                self._run(lambda: self._export(row.name, request), f"Exporting {row.name}…", None)

        self.app.push_screen(ExportScreen(row.name, Path.cwd()), export)

    def _export(self, name: str, request: ExportRequest) -> str:
        result = self.store.export(name, request.fmt, request.path, overwrite=request.overwrite)
        notes = "".join(f"\nnote: {notice}" for notice in result.notices)
        return f"Exported {name} to {', '.join(str(p) for p in result.paths)}{notes}"

    def action_import(self, typed: ImportRequest | None = None, error: str | None = None) -> None:
        def import_(request: ImportRequest | None) -> None:
            if request is not None:
                self._run(lambda: self._import(request), f"Importing {request.spec}…", None)

        self.app.push_screen(ImportScreen(find_hf_cached_models(), typed, error), import_)

    def _import(self, request: ImportRequest) -> tuple[str, str] | None:
        """In a worker. A file the store refuses opens the dialog again, with the error and what was typed."""
        try:
            result = self.store.import_weights(request.spec, request.name, n_heads=request.n_heads)
        except Gpt2termError as exc:
            self.app.call_from_thread(self.action_import, request, str(exc))
            return None
        notes = "".join(f"\nnote: {notice}" for notice in result.notices)
        return f"Imported {request.spec} as {result.info.name}.{notes}", result.info.name

    def action_sort(self) -> None:
        self.table.next_sort()
        label = dict((key, header) for key, header, _ in COLUMNS)[self.table.sort_column]
        self.notify(f"Sorted by {label}, {'descending' if self.table.sort_reverse else 'ascending'}.", timeout=3)

    def action_refresh(self) -> None:
        self.reload()

    # ------------------------------------------------------------------ running store operations

    def _run(self, operation: Callable[[], object], working: str, done: str | None, select: str | None = None) -> None:
        self.notify(working, timeout=3)
        self._operation(operation, done, select)

    @work(thread=True, exit_on_error=False, group="store")
    def _operation(self, operation: Callable[[], object], done: str | None, select: str | None) -> None:
        result = operation()
        if isinstance(result, tuple):
            done, select = result
        elif isinstance(result, str):
            done = result
        self.post_message(StoreOperationDone(done, None, select))

    def worker_failed(self, worker: Worker, error: str) -> None:
        """An operation refused or failed (a disk full, permissions): the store's writes are atomic, so nothing
        half-done stays; say why and show the store as it is."""
        if worker.group == "store":
            self.post_message(StoreOperationDone(None, error))
        else:
            super().worker_failed(worker, error)

    def on_store_operation_done(self, message: StoreOperationDone) -> None:
        if message.error:
            self.notify(message.error, title="Not done", severity="error", timeout=15)
        elif message.message:
            self.notify(message.message, timeout=8)
        self.reload(message.select)

    def action_surface(self) -> None:
        row = self._require_selected()
        if row is not None:
            from gpt2term.tui.screens.surface_view import SurfaceView

            self.app.push_screen(SurfaceView(row.name, self.store))

    def action_loss(self) -> None:
        """The course's loss steps of a text (asked first: the course's example by default) under the selected
        checkpoint, loaded in the view's worker."""
        row = self._require_selected()
        if row is None:
            return
        from gpt2term.tui.screens.loss_view import LossTextScreen, LossView

        def show(text: str | None) -> None:
            if text:
                ids = self.app.tokenizer.encode(text)
                self.app.push_screen(LossView(self.app.tokenizer, ids, checkpoint=row.name))

        self.app.push_screen(LossTextScreen(row.name), show)
