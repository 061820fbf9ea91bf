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


def _reply(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def serve() -> int:
    try:
        import ctranslate2

        spec = json.loads(sys.stdin.readline() or "null")
        if not isinstance(spec, dict):
            return 0  # the parent went away before saying what to load
        generator = ctranslate2.Generator(
            spec["folder"],
            device="cpu",
            compute_type=spec["compute_type"],
            inter_threads=1,
            intra_threads=int(spec["threads"]),
        )
        _reply({"ready": True})
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
            _reply({"ids": ids, "times": times})
    except BrokenPipeError:
        return 0
    except Exception as exc:  # the parent turns this into its one-line error
        _reply({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(serve())
