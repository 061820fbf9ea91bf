"""Cold start: seconds from launching `gpt2term generate` in a fresh process to its first token on stdout.

A user's first impression is a fresh process: importing torch, reading the weights, packing them, reading the
prompt. Without a checkpoint a random GPT-2 124M is saved in a temporary store first, so the number always means
"a 124M checkpoint on disk".
"""

from __future__ import annotations

import os
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT = "Every effort moves you"
IMPORTS = "import gpt2term.cli, gpt2term.core.generation, gpt2term.core.store.resolve, gpt2term.core.tokenizer"


def _first_token_s(args: list[str], env: dict[str, str], timeout_s: float) -> float:
    """Seconds until the child's stdout holds more than the prompt it echoes first (the first token's text)."""
    started = time.perf_counter()
    errors = tempfile.TemporaryFile()  # noqa: SIM115 - closed below, after the child has exited
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=errors, env=env)
    assert proc.stdout is not None
    seen = b""
    want = len(PROMPT.encode())
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while len(seen) <= want:
            left = timeout_s - (time.perf_counter() - started)
            if left <= 0 or not sel.select(left):
                proc.kill()
                raise TimeoutError(f"no first token within {timeout_s:.0f}s")
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            seen += chunk
    elapsed = time.perf_counter() - started
    seen += proc.stdout.read()  # let it finish writing: a closed pipe would fail its next write
    proc.wait(timeout=timeout_s)
    if proc.returncode != 0 or len(seen) <= want:
        errors.seek(0)
        said = errors.read().decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"gpt2term generate exited with status {proc.returncode} before its first token: {said[0]}")
    errors.close()
    return elapsed


def bench_cold_start(
    checkpoint: str | None = None, *, repeats: int = 3, dtype: str = "fp32", timeout_s: float = 600.0
) -> dict[str, Any]:
    """Median time to first token of `repeats` fresh `gpt2term generate` processes, and of their imports alone."""
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="gpt2term-cold-") as tmp:
        if checkpoint is None:
            import torch

            from gpt2term.core.config import preset
            from gpt2term.core.model import GPTModel
            from gpt2term.core.store.store import CheckpointStore

            env["GPT2TERM_HOME"] = tmp
            torch.manual_seed(123)
            store = CheckpointStore(Path(tmp) / "checkpoints")  # where GPT2TERM_HOME=tmp puts them
            store.save("cold-124M", GPTModel(preset("gpt2-124M")), meta={"step": 0})
            checkpoint, source = "cold-124M", "random GPT-2 124M checkpoint on disk"
        else:
            source = checkpoint
        args = [sys.executable, "-m", "gpt2term", "generate", PROMPT, "-c", checkpoint, "-n", "2", "--dtype", dtype]
        runs = [_first_token_s(args, env, timeout_s) for _ in range(repeats)]
        imports = []
        for _ in range(repeats):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", IMPORTS], check=True, env=env, timeout=timeout_s)
            imports.append(time.perf_counter() - started)
    return {
        "benchmark": "cold-start",
        "model": source,
        "dtype": dtype,
        "first_token_s": statistics.median(runs),
        "runs_first_token_s": [round(r, 3) for r in runs],
        "import_s": statistics.median(imports),
        "command": " ".join(args[1:]),
    }
