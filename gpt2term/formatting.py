"""Numbers as people read them, shared by the CLI and the TUI so both show the same thing."""

from __future__ import annotations

import datetime as dt
import math


def format_prob(p: float) -> str:
    """A probability as a percentage with enough digits to tell small ones apart (0.02%, 0.0018%)."""
    pct = p * 100
    if pct >= 10:
        return f"{pct:.1f}%"
    if pct >= 0.01:
        return f"{pct:.2f}%"
    return f"{pct:.2g}%"


def format_count(n: int | float) -> str:
    """124439808 -> 124.4M; 13000 -> 13.0K."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def format_bytes(n: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def format_duration(seconds: float | None) -> str:
    """A span of time, as short as reads clearly: 42s, 1m05s, 2h05m, 3d04h ("?" when unknown)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    for big, small, size, unit in (("d", "h", 86400, 3600), ("h", "m", 3600, 60), ("m", "s", 60, 1)):
        if seconds >= size:
            return f"{seconds // size}{big}{seconds % size // unit:02d}{small}"
    return f"{seconds}s"


def format_time(iso: str | None) -> str:
    """2025-01-02T10:00:00+00:00 -> 2025-01-02 11:00 in the user's time zone ("-" when unknown)."""
    if not iso:
        return "-"
    try:
        return dt.datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return iso
