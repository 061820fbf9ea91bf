"""The gpt2term app: three modes (Prompt, Train, Checkpoints), a model loaded in the background, remappable keys.

`make_app()` is the one way to build it, shared by `gpt2term` (the CLI) and the tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.dom import DOMNode
from textual.reactive import reactive
from textual.screen import Screen
from textual.worker import Worker

from gpt2term.core.model import GPTModel
from gpt2term.core.tokenizer import Tokenizer, default_tokenizer
from gpt2term.tui.dialogs import ConfirmScreen, LeaveRunScreen
from gpt2term.tui.keymap import DEFAULT_KEYS, bind, read_keymap
from gpt2term.tui.messages import ModelLoaded, ModelLoadFailed
from gpt2term.tui.model_source import AppModel, load_app_model
from gpt2term.tui.screens.checkpoints import CheckpointsScreen
from gpt2term.tui.screens.prompt import PromptScreen
from gpt2term.tui.screens.train import TrainScreen
from gpt2term.tui.workers import WorkerErrors

FIRST_TRAIN_NOTICE = "Opening the Train screen: building its form and charts (the first time takes a moment)…"


class Gpt2termApp(WorkerErrors, App):
    TITLE = "gpt2term"
    CSS_PATH = "app.tcss"
    MODES = {"prompt": PromptScreen, "train": TrainScreen, "checkpoints": CheckpointsScreen}
    DEFAULT_MODE = "prompt"
    BINDINGS = [
        bind("app.quit", "quit", priority=True),
        bind("app.command-palette", "command_palette", show=False, priority=True),
        bind("mode.prompt", "switch_mode('prompt')", show=False, priority=True),
        bind("mode.train", "switch_mode('train')", show=False, priority=True),
        bind("mode.checkpoints", "switch_mode('checkpoints')", show=False, priority=True),
    ]

    app_model: reactive[AppModel | None] = reactive(None, always_update=True)
    loading_label: reactive[str] = reactive("")
    load_error: reactive[str | None] = reactive(None)

    def __init__(
        self,
        load: Callable[[], AppModel],
        loading_label: str = "loading…",
        tokenizer: Tokenizer | None = None,
        keymap: dict[str, str] | None = None,
        keymap_error: str | None = None,
    ) -> None:
        super().__init__()
        self._load = load
        self._initial_loading_label = loading_label
        self._tokenizer = tokenizer
        self._keymap_error = keymap_error
        self.train_screen: TrainScreen | None = None  # set by the train screen once it exists
        self.train_request: tuple[str, str] | None = None  # ("resume" | "from" | "follow", checkpoint) for it
        if keymap:
            self.set_keymap(keymap)

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = default_tokenizer()
        return self._tokenizer

    def on_mount(self) -> None:
        if self._keymap_error:
            self.notify(self._keymap_error, title="Keymap: default keys used", severity="error", timeout=10)
        self.load_model(self._load, self._initial_loading_label)

    def load_model(self, load: Callable[[], AppModel], label: str) -> None:
        """Load in a thread (a GPT-2 takes seconds): the UI keeps answering, the body shows a loading indicator."""
        self.loading_label = label
        self.load_error = None
        self.app_model = None
        self._load_worker(load)

    @work(thread=True, exclusive=True, exit_on_error=False, group="load")
    def _load_worker(self, load: Callable[[], AppModel]) -> None:
        self.tokenizer  # noqa: B018 (build the tokenizer off the UI thread too)
        self.post_message(ModelLoaded(load()))

    def worker_failed(self, worker: Worker, error: str) -> None:
        if worker.group == "load":
            self.post_message(ModelLoadFailed(error))  # shown to the user; the app keeps running
        else:
            super().worker_failed(worker, error)

    def on_model_loaded(self, message: ModelLoaded) -> None:
        self.loading_label = ""
        self.app_model = message.app_model
        for notice in message.app_model.notices:
            self.notify(notice, timeout=8)

    def on_model_load_failed(self, message: ModelLoadFailed) -> None:
        self.loading_label = "no model loaded"
        self.load_error = message.error
        self.notify(message.error, title="Could not load the model", severity="error", timeout=15)

    # ------------------------------------------------------------------ modes, and a run that is training

    def _training(self) -> TrainScreen | None:
        train = self.train_screen
        return train if train is not None and train.run_active else None

    async def action_switch_mode(self, mode: str) -> None:
        self.request_mode(mode)

    def request_mode(self, mode: str) -> None:
        """Switch modes; leaving the Train mode while it trains asks whether to stop the run (it saves first)."""
        train = self._training()
        if mode == "train" and self.train_screen is None and self.current_mode != "train":
            # Building the Train screen the first time takes a moment: say so first, then build it.
            self.notify(FIRST_TRAIN_NOTICE, timeout=4)
            self.call_after_refresh(self.switch_mode, mode)
            return
        if mode == self.current_mode or self.current_mode != "train" or train is None:
            self.switch_mode(mode)
            return
        if isinstance(self.screen, LeaveRunScreen):
            return

        def answer(stop: bool | None) -> None:
            if stop is None:
                return
            if stop:
                train.stop_run()
            self.switch_mode(mode)

        self.push_screen(LeaveRunScreen(train.describe_run()), answer)

    async def action_quit(self) -> None:
        """Quit; with a run training, ask first, and stop it (which saves) before leaving."""
        train = self._training()
        if train is None:
            self.exit()
            return
        if isinstance(self.screen, ConfirmScreen) or train.state.status == "stopping":
            self.exit()  # asked twice: go now (the run still saves in the background before the program ends)
            return

        def answer(stop: bool | None) -> None:
            if stop:
                self.notify("Stopping the run and saving it; the app closes when it is saved.", timeout=30)
                train.stop_run(then=self.exit)

        question = f"{train.describe_run()}.\n\nStop it, save it, and quit?"
        self.push_screen(ConfirmScreen("A run is training", question, "Stop, save and quit", "Cancel"), answer)

    def open_in_prompt(self, name: str) -> None:
        """Load checkpoint `name` (as `gpt2term --checkpoint NAME` does) and show it in the Prompt mode."""
        self.load_model(lambda: load_app_model(name), f"loading {name}…")
        self.request_mode("prompt")

    def take_train_request(self) -> tuple[str, str] | None:
        """The train screen's pending request from `open_train` (once: taking it clears it)."""
        request, self.train_request = self.train_request, None
        return request

    def open_train(self, kind: str, name: str) -> None:
        """The Train mode, prefilled to resume or fine-tune `name` (kind "resume" / "from"), or following it."""
        self.train_request = (kind, name)
        if self.current_mode == "train" and self.train_screen is not None:
            self.train_screen.on_screen_resume()
        else:
            self.request_mode("train")

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """Every binding of the screen and of the widgets on it, by name and key, made from the bindings
        themselves: a new action is in the palette the moment it has a key."""
        yield from binding_commands(self, screen)
        yield from super().get_system_commands(screen)

    def _mode(self, mode: str) -> Callable[[], None]:
        return lambda: self.request_mode(mode)


def bound_actions(app: App, screen: Screen) -> list[tuple[DOMNode, Binding]]:
    """(node, binding) for each of our bindings on the app, the screen and the widgets on it, once per id."""
    found: dict[str, tuple[DOMNode, Binding]] = {}
    for node in (app, screen, *screen.walk_children()):
        for bindings in node._bindings.key_to_bindings.values():
            for binding in bindings:
                if binding.id in DEFAULT_KEYS and binding.id not in found:
                    found[binding.id] = (node, binding)
    return list(found.values())


def binding_commands(app: App, screen: Screen) -> Iterable[SystemCommand]:
    for node, binding in bound_actions(app, screen):
        spec = DEFAULT_KEYS[binding.id]
        keys = (getattr(app, "_keymap", None) or {}).get(binding.id, spec.keys).split(",")
        shown = "/".join(app.get_key_display(Binding(key, "")) for key in keys)
        yield SystemCommand(
            f"{spec.description} ({shown}): {spec.help}",
            f"key binding {binding.id} (remap it in keymap.toml)",
            partial(app.run_action, binding.action, node),
        )


def make_app(
    checkpoint: str | None = None,
    *,
    model: GPTModel | None = None,
    model_name: str = "model",
    untrained: bool = False,
    tokenizer: Tokenizer | None = None,
    keymap: dict[str, str] | None = None,
    n_heads: int | None = None,
) -> Gpt2termApp:
    """The app for a checkpoint (None: the most recently used, else an untrained GPT-2), or for a given model.
    `n_heads`: the head count of a .pth checkpoint, which carries none (`gpt2term -c model.pth --n-heads 8`).

    The keymap defaults to the user's `keymap.toml`; a broken file is reported in the app, which then uses the
    default keys.
    """
    keymap_error = None
    if keymap is None:
        keymap, problems = read_keymap()
        keymap_error = "\n".join(problems) or None
    if model is not None:
        given = AppModel(model.eval(), model_name, untrained=untrained)
        return Gpt2termApp(lambda: given, f"loading {model_name}…", tokenizer, keymap, keymap_error)
    label = f"loading {checkpoint}…" if checkpoint else "loading…"
    return Gpt2termApp(lambda: load_app_model(checkpoint, n_heads=n_heads), label, tokenizer, keymap, keymap_error)
