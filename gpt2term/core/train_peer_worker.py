"""transformers' training loop in a process of its own, for `bench train`.

A user runs their own loop in their own process; in ours it would inherit what gpt2term's trainer sets up for
itself (the allocator keeping freed memory, see `accel.allocator`), and be measured faster than it is.

Speaks JSON lines on stdin/stdout, like `peer_worker`: the first line gives the model and loop (`config`, `amp`,
`seed`, `device`, `threads`, `batches`: a file of token batches saved with torch.save) and gets `{"ready": true}`;
each following `{"step": i, "profile": bool}` runs one step on batch i and gets `{"loss": ..., "seconds": ...}`
(timed here, so the pipe costs nothing; a profiled step is not timed); `{"ops": true}` gets the profiled steps'
top ops. A failure is one `{"error": "..."}` line and exit status 1; end of input ends the process.
"""

from __future__ import annotations

import json
import sys
import time

from gpt2term.core.peer_worker import reply, run_worker, spec_line


def serve() -> None:
    spec = spec_line()
    if spec is None:
        return
    import torch

    from gpt2term.core.bench import _hf_training_step, _op_table, _profiler
    from gpt2term.core.config import GPTConfig
    from gpt2term.core.devices import resolve_dtype

    torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    batches = torch.load(spec["batches"], weights_only=True)
    step = _hf_training_step(GPTConfig.from_dict(spec["config"]), resolve_dtype(spec["amp"]), int(spec["seed"]), device)
    profiled: list = []
    reply({"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("ops"):
            reply({"ops": _op_table(profiled, device)})
            continue
        batch = batches[int(request["step"])]
        if request.get("profile"):
            prof = _profiler(device)
            with prof:
                loss = step(batch[:, :-1], batch[:, 1:])
            profiled.append(prof)
            reply({"loss": loss, "seconds": None})
            continue
        started = time.perf_counter()
        loss = step(batch[:, :-1], batch[:, 1:])
        reply({"loss": loss, "seconds": time.perf_counter() - started})


if __name__ == "__main__":
    sys.exit(run_worker(serve))
