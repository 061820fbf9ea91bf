"""Every key binding of the app in one table, and the user's overrides from `keymap.toml` in the config dir.

Each binding has an id (Textual's `Binding.id`), so a user remaps it without knowing which widget owns it:

    # ~/.config/gpt2term/keymap.toml
    "prompt.generate" = "ctrl+r"
    [prompt]
    copy = "f8"          # same as "prompt.copy" = "f8"

The README's key table is checked against `DEFAULT_KEYS` by a test, so the documentation cannot drift.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from textual.binding import Binding

from gpt2term import locations
from gpt2term.core.errors import Gpt2termError


class KeymapError(Gpt2termError):
    """A keymap file that cannot be read or names a binding that does not exist."""


@dataclass(frozen=True)
class KeySpec:
    keys: str  # Textual key names, comma-separated for several
    description: str  # shown in the footer
    help: str  # shown in the README's table and the command palette


DEFAULT_KEYS: dict[str, KeySpec] = {
    "app.quit": KeySpec("ctrl+q", "Quit", "quit the app"),
    "app.command-palette": KeySpec("ctrl+p", "Commands", "open the command palette (modes, settings, toggles, ...)"),
    "mode.prompt": KeySpec("f2", "Prompt", "switch to the Prompt mode"),
    "mode.train": KeySpec("f3", "Train", "switch to the Train mode"),
    "mode.checkpoints": KeySpec("f4", "Checkpoints", "switch to the Checkpoints mode"),
    "prompt.generate": KeySpec("enter", "Generate", "generate a continuation of the prompt"),
    "prompt.newline": KeySpec(
        "shift+enter,ctrl+j", "Newline", "new line in the prompt (Shift+Enter where the terminal reports it)"
    ),
    "prompt.history-previous": KeySpec("up", "Previous prompt", "on the prompt's first line: recall an earlier prompt"),
    "prompt.history-next": KeySpec("down", "Next prompt", "on the prompt's last line: recall a later prompt"),
    "prompt.stop": KeySpec("escape", "Stop", "stop generating at once (between two tokens)"),
    "prompt.back": KeySpec("escape", "Back", "from the token cursor back to the prompt"),
    "prompt.inspect": KeySpec("tab", "Inspect", "move focus between the prompt and the token cursor"),
    "prompt.settings": KeySpec("ctrl+o", "Settings", "decoding settings: greedy, temperature, top-k, top-p, ..."),
    "prompt.toggle-colours": KeySpec("ctrl+l", "Colours", "colour each generated token by its probability"),
    "prompt.toggle-boundaries": KeySpec("ctrl+t", "Tokens", "show token boundaries"),
    "prompt.copy": KeySpec("ctrl+g", "Copy", "copy the last completion to the clipboard (OSC 52)"),
    "prompt.save": KeySpec("ctrl+s", "Save", "save the transcript to a file (.md, or .json with every token)"),
    "prompt.compare": KeySpec("ctrl+b", "Compare", "the last prompt decoded greedily, sampled and by beam search"),
    "prompt.versus": KeySpec("ctrl+n", "Versus", "the last prompt answered by this model and another checkpoint"),
    "tokens.previous": KeySpec("left", "Prev token", "token cursor: previous generated token"),
    "tokens.next": KeySpec("right", "Next token", "token cursor: next generated token"),
    "tokens.first": KeySpec("home", "First", "token cursor: first token of the completion"),
    "tokens.last": KeySpec("end", "Last", "token cursor: last token of the completion"),
    "tokens.attention": KeySpec("a", "Attention", "token cursor: what the selected token attended to"),
    "tokens.lens": KeySpec("l", "Logit lens", "token cursor: what each layer predicted in place of the token"),
    "attention.layer-previous": KeySpec("up", "Layer up", "attention view: previous layer"),
    "attention.layer-next": KeySpec("down", "Layer down", "attention view: next layer"),
    "attention.head-previous": KeySpec("left", "Prev head", "attention view: previous head (before head 1: mean)"),
    "attention.head-next": KeySpec("right", "Next head", "attention view: next head"),
    "train.start": KeySpec("f5,ctrl+r", "Start", "start a training run with the form's settings"),
    "train.pause": KeySpec("f6", "Pause", "pause the run after the current step"),
    "train.resume": KeySpec("f6", "Resume", "resume a paused run"),
    "train.save": KeySpec("f7", "Save now", "save a checkpoint of the run now"),
    "train.stop": KeySpec("f8", "Stop", "stop the run after the current step (it saves first)"),
    "train.follow": KeySpec("f9", "Follow", "follow a run another process is writing (its metrics.jsonl), read-only"),
    "train.unfollow": KeySpec("escape", "Unfollow", "stop following that run"),
    "train.prompt": KeySpec("ctrl+l", "Prompt it", "load the run's checkpoint in the Prompt mode"),
    "train.data": KeySpec("ctrl+t", "Data", "the form's corpus as the model sees it: ids, windows, batches"),
    "data.batch-previous": KeySpec("left", "Prev batch", "data view: the batch of the previous step"),
    "data.batch-next": KeySpec("right", "Next batch", "data view: the batch of the next step"),
    "checkpoints.load": KeySpec("l", "Load", "load the selected checkpoint in the Prompt mode (Enter too)"),
    "checkpoints.train": KeySpec("t", "Train", "resume its training run (or fine-tune it) in the Train mode"),
    "checkpoints.rename": KeySpec("r", "Rename", "rename the selected checkpoint"),
    "checkpoints.copy": KeySpec("c", "Copy", "copy the selected checkpoint to a new name"),
    "checkpoints.delete": KeySpec("d,delete", "Delete", "delete the selected checkpoint (asks first)"),
    "checkpoints.export": KeySpec("e", "Export", "export to the Hugging Face or the book's format"),
    "checkpoints.import": KeySpec("i", "Import", "import weights: a file, a folder, or GPT-2 from the HF cache"),
    "checkpoints.follow": KeySpec("f", "Follow", "follow the selected checkpoint's run live in the Train mode"),
    "checkpoints.sort": KeySpec("s", "Sort", "sort the table by the next column (click a header to pick one)"),
    "checkpoints.refresh": KeySpec("f5", "Refresh", "read the store again"),
    "checkpoints.surface": KeySpec("u", "Surface", "the loss surface around the selected checkpoint (cached with it)"),
    "dialog.cancel": KeySpec("escape", "Cancel", "close a dialog without changing anything"),
    "dialog.apply": KeySpec("ctrl+s", "Apply", "apply a dialog (Enter in a field does the same)"),
    "dialog.yes": KeySpec("y", "Yes", "answer yes in a question dialog"),
    "dialog.no": KeySpec("n", "No", "answer no in a question dialog"),
    "prompt.loss": KeySpec("ctrl+f", "Loss", "the loss, step by step, of the selected (else the last) turn's text"),
    "checkpoints.loss": KeySpec("x", "Loss", "the loss step by step of a text under the selected checkpoint"),
    "loss.dropout": KeySpec("d", "Dropout", "loss view: the same text in train mode (dropout on) and in eval mode"),
}

KEYMAP_FILE = "keymap.toml"


def bind(binding_id: str, action: str, *, show: bool = True, priority: bool = False) -> Binding:
    """A Textual `Binding` with its default key and description from `DEFAULT_KEYS`, carrying its id."""
    spec = DEFAULT_KEYS[binding_id]
    return Binding(spec.keys, action, spec.description, show=show, priority=priority, id=binding_id)


def key_display(app, binding_id: str) -> str:  # app: a textual App
    """How the app shows the key of `binding_id` right now (the user's keymap included), e.g. "^o" or "enter"."""
    keys = (getattr(app, "_keymap", None) or {}).get(binding_id, DEFAULT_KEYS[binding_id].keys)
    return app.get_key_display(Binding(keys.split(",")[0], ""))


def keymap_path() -> Path:
    return locations.config_dir() / KEYMAP_FILE


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


MODIFIERS = frozenset({"ctrl", "shift", "alt", "meta", "super", "hyper"})


def _key_names() -> frozenset[str]:
    from textual.keys import KEY_ALIASES, KEY_TO_UNICODE_NAME, REPLACED_KEYS, Keys

    names = {key.value.rpartition("+")[2] for key in Keys if not key.value.startswith("<")}
    names |= set(KEY_TO_UNICODE_NAME) | set(REPLACED_KEYS) | set(KEY_ALIASES) | {"newline"}
    return frozenset(names)


def invalid_key(keys: str) -> str | None:
    """The first key in a comma-separated list that no terminal can send (Textual binds any string silently)."""
    for key in keys.split(","):
        *modifiers, base = key.strip().split("+")
        if any(m not in MODIFIERS for m in modifiers) or not base:
            return key
        if len(base) == 1:
            if not base.isprintable():
                return key
            continue
        if base in _key_names():
            continue
        try:  # Textual's names for punctuation: question_mark, exclamation_mark, ...
            if len(unicodedata.lookup(base.replace("_", " ").upper())) == 1:
                continue
        except KeyError:
            pass
        return key
    return None


def _check_entries(keymap: dict[str, Any], source: str) -> tuple[dict[str, str], list[str]]:
    good: dict[str, str] = {}
    problems: list[str] = []
    for binding_id, keys in keymap.items():
        if binding_id not in DEFAULT_KEYS:
            problems.append(f"{source}: unknown binding id {binding_id!r}; valid ids: {', '.join(DEFAULT_KEYS)}")
        elif not isinstance(keys, str) or not keys.strip():
            problems.append(f'{source}: {binding_id} must be a key name in quotes, e.g. "ctrl+r" or "f5,ctrl+r"')
        elif (bad := invalid_key(keys.replace(" ", ""))) is not None:
            problems.append(
                f"{source}: {binding_id} = {keys!r}: {bad!r} is not a key name; use names like "
                '"ctrl+r", "f5", "a", "question_mark" (modifiers: ctrl, shift, alt, meta, super)'
            )
        else:
            good[binding_id] = keys.replace(" ", "")
    return good, problems


def _table(text: str, source: str) -> dict[str, Any]:
    try:
        if source.endswith(".json"):
            table = json.loads(text)
        else:
            import tomllib

            table = tomllib.loads(text)
    except ImportError as exc:  # Python 3.10
        raise KeymapError(f"{source}: reading TOML needs Python 3.11+; write it as keymap.json instead") from exc
    except ValueError as exc:  # tomllib.TOMLDecodeError and json.JSONDecodeError are ValueErrors
        raise KeymapError(f"{source}: not valid TOML/JSON ({exc}); fix the line it names or delete the file") from exc
    if not isinstance(table, dict):
        raise KeymapError(f'{source}: expected a table of binding ids to keys, e.g. "prompt.generate" = "ctrl+r"')
    return _flatten(table)


def parse_keymap(text: str, source: str = KEYMAP_FILE) -> dict[str, str]:
    """Binding id -> keys from a TOML (or JSON) keymap; unknown ids and non-string keys are errors that say why."""
    keymap, problems = _check_entries(_table(text, source), source)
    if problems:
        raise KeymapError(problems[0])
    return keymap


def load_keymap(path: Path | None = None) -> dict[str, str]:
    """The user's overrides: `keymap.toml` (or `keymap.json`) in the config dir; none when there is no file."""
    if path is None:
        path = keymap_path()
        if not path.exists() and path.with_suffix(".json").exists():
            path = path.with_suffix(".json")
    if not path.exists():
        return {}
    return parse_keymap(_read(path), str(path))


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KeymapError(f"{path}: cannot be read ({exc.strerror}); fix its permissions or delete it") from exc
    except UnicodeDecodeError as exc:
        raise KeymapError(
            f"{path}: not UTF-8 text (byte {exc.start} is invalid); save it as UTF-8 or delete it"
        ) from exc


def read_keymap(path: Path | None = None) -> tuple[dict[str, str], list[str]]:
    """What the app starts with: the usable entries of the user's keymap, and a line for each problem (a broken
    file gives none of its entries; a bad entry leaves its binding on the default key)."""
    if path is None:
        path = keymap_path()
        if not path.exists() and path.with_suffix(".json").exists():
            path = path.with_suffix(".json")
    if not path.exists():
        return {}, []
    try:
        table = _table(_read(path), str(path))
    except KeymapError as exc:
        return {}, [str(exc)]
    return _check_entries(table, str(path))
