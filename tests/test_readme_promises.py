"""The README's table of promises names the tests that keep them: every name must be a test that exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _promise_rows() -> list[tuple[str, list[tuple[str, str]]]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Promises, and the tests that keep them", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith("| promise") or set(line) <= set("|- "):
            continue
        promise, tests = (cell.strip() for cell in line.strip("|").split("|", 1))
        named, current = [], None
        for code in re.findall(r"`([^`]+)`", tests):
            if "::" in code:
                current, code = code.split("::", 1)
            if current and re.fullmatch(r"test_\w+", code):
                named.append((current, code))
        rows.append((promise, named))
    return rows


def test_every_promise_names_tests_that_exist():
    rows = _promise_rows()
    assert len(rows) >= 15
    for promise, named in rows:
        if "whole suite" in promise or "GPT2TERM_ACCEL" in promise:
            continue
        assert named, f"the promise {promise!r} names no test"
        for file, name in named:
            source = (ROOT / "tests" / file).read_text(encoding="utf-8")
            assert re.search(rf"^(async )?def {name}\(", source, re.M), f"{file}::{name} (for {promise!r}) is no test"
