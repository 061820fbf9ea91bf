"""CTranslate2 decoding in a process of its own, for `bench generate --peers`.

A user runs CTranslate2 in its own process, and two engines in one process slow each other down: each brings its
own OpenMP runtime and thread pool (CTranslate2 ships a second libgomp beside PyTorch's), and after CTranslate2
has decoded once in a process, PyTorch's one-token matmuls there run measurably slower, and CTranslate2's fp32
too. So the benchmark's parent process runs gpt2term and transformers, and each CTranslate2 model runs here.

Speaks JSON lines on stdin/stdout: the first line names the model (`folder`, `compute_type`, `threads`) and gets
`{"ready": true}`; each following `{"prompt": [token strings], "tokens": n}` gets `{"ids": [...], "times": [...]}`,
times in seconds since the request arrived, measured here so the pipe costs nothing. A failure is one
`{"error": "..."}` line and exit status 1. End of input (the parent closed the pipe, or died) ends the process.
This module imports neither torch nor the rest of gpt2term.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable


def reply(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def spec_line() -> dict | None:
    """The first line: what to load (None: the parent went away before saying)."""
    spec = json.loads(sys.stdin.readline() or "null")
    return spec if isinstance(spec, dict) else None


def run_worker(serve: Callable[[], None]) -> int:
    """Exit status of a worker: 0, also when the parent went away; 1 after one `{"error"}` line."""
    try:
        serve()
    except BrokenPipeError:
        return 0
    except Exception as exc:  # the parent turns this into its one-line error
        reply({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    return 0


def serve() -> None:
    import ctranslate2

    spec = spec_line()
    if spec is None:
        return
    generator = ctranslate2.Generator(
        spec["folder"],
        device="cpu",
        compute_type=spec["compute_type"],
        inter_threads=1,
        intra_threads=int(spec["threads"]),
    )
    reply({"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        ids: list[int] = []
        times: list[float] = []
        start = time.perf_counter()
        # end_token=[]: never stop at <|endoftext|>, so every contender produces the same number of tokens.
        for step in generator.generate_tokens(
            request["prompt"], max_length=int(request["tokens"]), sampling_topk=1, end_token=[]
        ):
            times.append(time.perf_counter() - start)
            ids.append(int(step.token_id))
        reply({"ids": ids, "times": times})


if __name__ == "__main__":
    sys.exit(run_worker(serve))
