"""Every path gpt2term reads or writes, in one place, so `gpt2term locate` and the tests agree with the code.

`GPT2TERM_HOME` moves everything (data, cache, config) under one folder: tests, portable installs, and servers
where the home directory is small. Without it, the platform's usual folders are used (platformdirs).
Nothing here creates folders; the code that writes creates what it needs.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "gpt2term"
HOME_ENV = "GPT2TERM_HOME"


def _override() -> Path | None:
    value = os.environ.get(HOME_ENV, "").strip()
    return Path(value).expanduser() if value else None


def home() -> Path:
    """The data folder: checkpoints and app state live here."""
    return _override() or Path(platformdirs.user_data_dir(APP_NAME))


def checkpoints_dir() -> Path:
    return home() / "checkpoints"


def exports_dir() -> Path:
    """Where the app saves what you ask it to (transcripts, exported models) unless you type another path: never
    the current folder, which may be a git clone."""
    return home() / "exports"


def cache_dir() -> Path:
    """Things that can be rebuilt (tokenized corpora, ...): safe to delete."""
    override = _override()
    return override / "cache" if override else Path(platformdirs.user_cache_dir(APP_NAME))


def config_dir() -> Path:
    override = _override()
    return override / "config" if override else Path(platformdirs.user_config_dir(APP_NAME))


def state_path() -> Path:
    """Small app state (the most recently used checkpoint, ...), one JSON object."""
    return home() / "state.json"


def hf_cache_dir() -> Path:
    """Where `huggingface_hub` keeps downloaded models, with the same environment variables it honours."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def all_paths() -> dict[str, Path]:
    """What `gpt2term locate` prints: every location, by name."""
    return {
        "home": home(),
        "checkpoints": checkpoints_dir(),
        "exports": exports_dir(),
        "cache": cache_dir(),
        "config": config_dir(),
        "state": state_path(),
        "huggingface_cache": hf_cache_dir(),
    }
