"""Numbers as people read them: one format for each kind, shared by the CLI and the TUI."""

from __future__ import annotations

import pytest

from gpt2term.formatting import format_duration
from gpt2term.tui.dialogs import describe_age


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(None, "?"), (float("nan"), "?"), (float("inf"), "?"), (0.4, "0s"), (42, "42s"), (65, "1m05s"),
     (3599, "59m59s"), (7500, "2h05m"), (3 * 86400 + 4 * 3600, "3d04h")],
)  # fmt: skip
def test_a_duration_reads_the_same_wherever_it_is_shown(seconds, shown):
    assert format_duration(seconds) == shown


def test_the_follow_dialog_and_the_train_screen_show_durations_in_that_format():
    assert describe_age(65) == "last event 1m05s ago" and describe_age(None) == "no events yet"
