"""gpt2term's own kernels for decoding (`matvec.c`), built with the machine's C compiler on first use.

Decoding one token reads every weight once, so its speed is how fast a kernel streams the matrices. PyTorch's
kernels for one row stream them well below what the memory gives (oneDNN and MKL are built for many rows), and
fbgemm's int8 also wants 8-bit activations, which move GPT-2's greedy tokens. `matvec.c` reads float32, bf16 or
int8 weights laid out in tiles of `TILE` output columns, converts them to float32 in registers and sums in float32,
for any number of rows (`TiledMatrix`). For one token it also runs a whole transformer block in one call
(`BlockStep`): between a block's matrices there is only a little work, which in PyTorch costs more than itself.

Only on x86-64 with AVX2 and FMA, with a C compiler (`$CC`, else `cc`) that has OpenMP, and only where PyTorch's
own OpenMP runtime is libgomp (the kernels must share its threads, not bring a second pool). Anywhere else, after
any failure, or with GPT2TERM_NATIVE=0, decoding uses PyTorch's kernels and `why_not()` says why. The library lives
in the cache folder, named by a hash of its source and flags, so a new version builds its own and two processes
building at once each write a file of their own and rename it into place.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import signal
import subprocess
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from gpt2term.core.accel import int8

SWITCH = "GPT2TERM_NATIVE"  # =0: PyTorch's kernels only (to compare, or where the compiler misbehaves)
SOURCE = Path(__file__).with_name("matvec.c")
TILE = 32  # output columns per tile; matvec.c's TILE, checked when the library loads
COMPILE_FLAGS = ("-O3", "-mavx2", "-mfma", "-fno-math-errno", "-fopenmp", "-fPIC")  # no errno: sqrt inline
BUILD_TIMEOUT_S = 120
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.int8: "i8"}
_ARGTYPES = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 4
_BLOCK_ARGTYPES = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 5 + [ctypes.c_void_p, ctypes.c_int]

_lock = threading.Lock()
_state: dict[str, object] = {}  # "library" once loaded and checked, else "why"


def enabled() -> bool:
    """False when GPT2TERM_NATIVE=0 (also "false", "off", "no")."""
    return os.environ.get(SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def available() -> bool:
    """The kernels are built, loaded and give the reference's numbers here (decided once per process)."""
    return enabled() and _library() is not None


def supports(dtype: torch.dtype) -> bool:
    """Whether the kernels hold weights of `dtype` (float32, bf16, int8; not float16 or float64)."""
    return dtype in _SUFFIX


def why_not() -> str | None:
    """Why the kernels are not used (None when they are)."""
    if not enabled():
        return f"{SWITCH}=0"
    _library()
    why = _state.get("why")
    return str(why) if why is not None else None


def library_path(gomp: Path | None = None) -> Path:
    """Where the library built against `gomp` (PyTorch's libgomp, found if not given) is cached."""
    from gpt2term import locations

    try:
        source = SOURCE.read_bytes()
    except OSError as exc:
        why = f"{SOURCE.name} is missing from this installation ({exc.strerror}); reinstall gpt2term"
        raise _Unavailable(why) from exc
    built_with = [*COMPILE_FLAGS, str(gomp or pytorch_openmp())]  # another PyTorch (another libgomp): another file
    digest = hashlib.sha256(source + "\0".join(built_with).encode()).hexdigest()[:16]
    return locations.cache_dir() / "kernels" / f"matvec-{platform.machine()}-{digest}.so"


class _Library:
    """The loaded library's entry points: per weight dtype, the matrix-vector product and the one-token block."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.matvec: dict[torch.dtype, ctypes._CFuncPtr] = {}
        self.block: dict[torch.dtype, ctypes._CFuncPtr] = {}
        for dtype, suffix in _SUFFIX.items():
            self.matvec[dtype] = _declare(getattr(lib, f"gpt2term_matvec_{suffix}"), _ARGTYPES, None)
            self.block[dtype] = _declare(getattr(lib, f"gpt2term_block_{suffix}"), _BLOCK_ARGTYPES, None)
        self.block_work = _declare(lib.gpt2term_block_work, [ctypes.c_int] * 4, ctypes.c_long)


def _declare(fn: ctypes._CFuncPtr, argtypes: list, restype: object) -> ctypes._CFuncPtr:
    fn.argtypes, fn.restype = argtypes, restype
    return fn


def _library() -> _Library | None:
    with _lock:
        if "library" not in _state and "why" not in _state:
            try:
                library = _load()
                why = _check(library)
            except _Unavailable as exc:
                library, why = None, str(exc)
            except (OSError, RuntimeError, ValueError, AttributeError) as exc:  # never worth failing a decode for
                library, why = None, f"the kernels could not be set up: {exc}"
            if why is None:
                _state["library"] = library
            else:
                _state["why"] = why
        return _state.get("library")  # type: ignore[return-value]


class _Unavailable(Exception):
    pass


def _openmp_files() -> set[str]:
    """Every OpenMP runtime mapped into this process (GNU's libgomp, LLVM's libomp, Intel's libiomp)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError as exc:
        raise _Unavailable(f"cannot read /proc/self/maps ({exc.strerror})") from exc
    names = ("libgomp", "libomp", "libiomp")
    return {line.split()[-1] for line in maps.splitlines() if line.rsplit("/", 1)[-1].startswith(names)}


def pytorch_openmp() -> Path:
    """The libgomp file PyTorch threads with, which the library is linked against (so the loader binds it to that
    same copy: one thread pool, not two)."""
    if platform.system() != "Linux":
        raise _Unavailable(f"the kernels are built only on Linux (this is {platform.system()})")
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        raise _Unavailable("this PyTorch does not thread with OpenMP")
    torch_lib = Path(torch.__file__).parent / "lib"
    gomp = sorted(f for f in _openmp_files() if Path(f).name.startswith("libgomp"))
    # Other libraries may bring renamed copies of their own (CTranslate2's libgomp-<hash>.so.1): PyTorch's is the
    # one in its own folder, or the only one loaded.
    own = [f for f in gomp if Path(f).parent == torch_lib] or gomp
    if len(own) != 1:
        raise _Unavailable("PyTorch's OpenMP runtime is not GNU libgomp, which the kernels are built for")
    return Path(own[0])


def _supported_platform() -> Path:
    """PyTorch's libgomp, where this machine can run the kernels whatever the compiler (else _Unavailable)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise _Unavailable(f"the kernels are written for x86-64 (this is {platform.machine()})")
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        raise _Unavailable("this CPU lacks AVX2")
    return pytorch_openmp()


def platform_reason() -> str | None:
    """Why this machine cannot run the kernels whatever the compiler (None: it can)."""
    try:
        _supported_platform()
    except _Unavailable as exc:
        return str(exc)
    return None


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC", "").strip() or "cc")


def _load() -> _Library:
    gomp = _supported_platform()
    path = library_path(gomp)
    before = _openmp_files()
    if not path.exists():
        _build(path, gomp)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        _build(path, gomp)  # a damaged or foreign file: build it again, once
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise _Unavailable(f"the built kernel library does not load: {exc}") from exc
    added = _openmp_files() - before
    if added:  # too late to unload it, but never use it: its threads would fight PyTorch's
        raise _Unavailable(f"the built kernels brought a second OpenMP runtime ({Path(min(added)).name}); use gcc")
    if lib.gpt2term_matvec_tile() != TILE:
        raise _Unavailable(f"{path} was built with another tile width; delete it")
    return _Library(lib)


def _run_compiler(command: list[str]) -> None:
    try:
        proc = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
    except FileNotFoundError as exc:
        raise _Unavailable(f"no C compiler ({command[0]} not found; install gcc or set CC)") from exc
    except OSError as exc:
        raise _Unavailable(f"the C compiler could not run: {exc}") from exc
    try:
        _, stderr = proc.communicate(timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and what it started (cc1, as, ld)
        proc.communicate()
        raise _Unavailable(f"the C compiler took over {BUILD_TIMEOUT_S} s") from exc
    if proc.returncode != 0:
        first = next((line for line in stderr.splitlines() if line.strip()), f"exit status {proc.returncode}")
        raise _Unavailable(f"the C compiler failed: {first.strip()}")


def _build(path: Path, gomp: Path) -> None:
    """Compile with OpenMP, then link against PyTorch's libgomp itself (never the compiler's own runtime)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _Unavailable(f"cannot create {path.parent} for the built kernels ({exc.strerror})") from exc
    partial = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.part")
    objects = partial.with_suffix(".o")
    try:
        _run_compiler([*_compiler(), *COMPILE_FLAGS, "-c", str(SOURCE), "-o", str(objects)])
        link = ["-shared", str(objects), str(gomp), f"-Wl,-rpath,{gomp.parent}", "-lm", "-o", str(partial)]
        _run_compiler([*_compiler(), *link])
        os.replace(partial, path)
    except OSError as exc:
        raise _Unavailable(f"cannot put the built kernels in {path.parent} ({exc.strerror})") from exc
    finally:
        partial.unlink(missing_ok=True)
        objects.unlink(missing_ok=True)


def _check(library: _Library) -> str | None:
    """None when every kernel gives the reference's numbers on shapes that reach every branch, else what failed."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(45, 37, generator=gen)  # neither a whole number of tiles nor of paired k steps
    bias = torch.randn(45, generator=gen)
    x = torch.randn(3, 37, generator=gen)  # a pair of rows and a single one
    with torch.inference_mode(False), torch.no_grad():
        for dtype in library.matvec:
            for b in (bias, None):
                matrix = TiledMatrix(weight, b, dtype, _library=library)
                expected = x @ matrix.dense().t() + (0 if b is None else b)
                if not torch.allclose(matrix(x), expected, rtol=1e-5, atol=1e-5):
                    return f"the {dtype} kernel gives wrong numbers here"
            if not _block_matches(library, dtype, gen):
                return f"the {dtype} block step gives wrong numbers here"
    return None


def _block_matches(library: _Library, dtype: torch.dtype, gen: torch.Generator) -> bool:
    """The block step against the same block in PyTorch: 2 heads of 12 (no whole vector of 8), a hidden layer of
    40 (part of a tile), at position 9 of 11 (past one vector of scores)."""
    d, heads, ff, capacity, pos = 24, 2, 40, 11, 9
    hd = d // heads

    def norm() -> tuple[torch.Tensor, torch.Tensor, float]:
        return 1 + 0.1 * torch.randn(d, generator=gen), 0.1 * torch.randn(d, generator=gen), 1e-5

    def linear(out_features: int, in_features: int, bias: bool) -> TiledMatrix:
        b = torch.randn(out_features, generator=gen) * 0.1 if bias else None
        return TiledMatrix(torch.randn(out_features, in_features, generator=gen) * 0.2, b, dtype, _library=library)

    norm1, norm2 = norm(), norm()
    matrices = (linear(3 * d, d, False), linear(d, d, True), linear(ff, d, True), linear(d, ff, True))
    x = torch.randn(d, generator=gen)
    keys, values = torch.randn(2, heads, capacity, hd, generator=gen).unbind(0)
    step = BlockStep(norm1, matrices, norm2, heads, _library=library)
    got, got_keys, got_values = x.clone(), keys.clone(), values.clone()
    step(got, got_keys, got_values, pos, torch.empty(step.work_floats(capacity)))

    def dense(m: TiledMatrix, v: torch.Tensor) -> torch.Tensor:
        return v @ m.dense().t() + (0 if m.bias is None else m.bias[: m.out_features])

    q, k, v = dense(matrices[0], F.layer_norm(x, (d,), *norm1[:2], norm1[2])).view(3, heads, 1, hd)
    keys[:, pos], values[:, pos] = k[:, 0], v[:, 0]
    ctx = F.scaled_dot_product_attention(q, keys[:, : pos + 1], values[:, : pos + 1]).reshape(d)
    x = x + dense(matrices[1], ctx)
    hidden = F.gelu(dense(matrices[2], F.layer_norm(x, (d,), *norm2[:2], norm2[2])), approximate="tanh")
    x = x + dense(matrices[3], hidden)
    return (
        torch.allclose(got, x, rtol=1e-4, atol=1e-4)
        and torch.allclose(got_keys, keys, rtol=1e-5, atol=1e-5)
        and torch.allclose(got_values, values, rtol=1e-5, atol=1e-5)
    )


def _padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    out = torch.zeros(rows, *t.shape[1:], dtype=t.dtype)
    out[: t.shape[0]] = t
    return out


class TiledMatrix:
    """A linear layer for the kernels: `__call__(x)` is `x @ W.T + bias` for float32 `x` [rows, in].

    `W` [out, in] is kept as float32, bf16 or int8 (symmetric, one scale per output channel: `int8.quantize`), in
    tiles `[ceil(out / TILE), in, TILE]`, padded with zero columns.
    """

    __slots__ = ("dtype", "tiles", "scale", "bias", "out_features", "in_features", "_fn", "_pointers")

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        *,
        _library: _Library | None = None,
    ) -> None:
        library = _library if _library is not None else _library_or_raise()
        self.dtype = dtype
        self._fn = library.matvec[dtype]
        self.out_features, self.in_features = weight.shape
        w = weight.detach().float()
        self.scale = None
        if dtype == torch.int8:
            w, scale = int8.quantize(w)
            self.scale = _padded(scale, self._padded_out())
        elif dtype == torch.bfloat16:
            w = w.to(torch.bfloat16)
        n_tiles = self._padded_out() // TILE
        self.tiles = _padded(w, self._padded_out()).view(n_tiles, TILE, self.in_features).transpose(1, 2).contiguous()
        self.bias = None if bias is None else _padded(bias.detach().float(), self._padded_out())
        # The kernel's weight arguments, fixed while this object holds the tensors (spared on every token's calls).
        self._pointers = tuple(None if t is None else t.data_ptr() for t in (self.tiles, self.scale, self.bias))

    def _padded_out(self) -> int:
        return -(-self.out_features // TILE) * TILE

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.tiles, self.scale, self.bias) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def dense(self) -> torch.Tensor:
        """The float32 [out, in] matrix the kernel multiplies by (dequantised for int8)."""
        w = self.tiles.transpose(1, 2).reshape(-1, self.in_features).float()
        if self.scale is not None:
            w = w * self.scale[:, None]
        return w[: self.out_features]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """On as many threads as PyTorch's setting says (what `threads.GovernedStep` sets for a decoding step)."""
        x = x.float().contiguous()
        rows = x.shape[0]
        if x.shape[1] != self.in_features:
            raise ValueError(f"expected {self.in_features} input features, got {x.shape[1]}")
        y = torch.empty(rows, self.out_features, dtype=torch.float32)
        if rows:
            self._fn(
                *self._pointers,
                x.data_ptr(),
                y.data_ptr(),
                rows,
                self.in_features,
                self.out_features,
                torch.get_num_threads(),
            )
        return y


class _BlockWeights(ctypes.Structure):
    """matvec.c's `gpt2term_block`: pointers to one block's norms and tiled matrices."""

    _fields_ = [
        ("norm1_scale", ctypes.c_void_p),
        ("norm1_shift", ctypes.c_void_p),
        ("norm2_scale", ctypes.c_void_p),
        ("norm2_shift", ctypes.c_void_p),
        ("norm1_eps", ctypes.c_float),
        ("norm2_eps", ctypes.c_float),
        ("tiles", ctypes.c_void_p * 4),
        ("scale", ctypes.c_void_p * 4),
        ("bias", ctypes.c_void_p * 4),
    ]


Norm = tuple[torch.Tensor, torch.Tensor, float]  # a layer norm's scale, shift and eps


class BlockStep:
    """One transformer block for one token on the kernels, in one call (and one OpenMP region): layer norm, fused
    query/key/value, this token's keys and values into the cache, attention over the cache, output projection and
    residual, layer norm, feed-forward with GELU, residual.

    Decoding a token calls a block's matrices one after another with little work between them; PyTorch's small
    operations and the thread start-ups between them are most of what a step spends outside the matrices.
    `matrices`: query-key-value [3d, d], attention output, feed-forward in (GELU), feed-forward out, all TiledMatrix
    of one dtype.
    """

    __slots__ = ("heads", "emb_dim", "hidden", "_fn", "_work", "_struct", "_address", "_keep")

    def __init__(
        self,
        norm1: Norm,
        matrices: tuple[TiledMatrix, TiledMatrix, TiledMatrix, TiledMatrix],
        norm2: Norm,
        heads: int,
        *,
        _library: _Library | None = None,
    ) -> None:
        library = _library if _library is not None else _library_or_raise()
        dtype = matrices[0].dtype
        if any(m.dtype != dtype for m in matrices):
            raise ValueError("a block's matrices must share one dtype")
        self.heads, self.emb_dim, self.hidden = heads, matrices[0].in_features, matrices[2].out_features
        self._fn, self._work = library.block[dtype], library.block_work
        norms = [t.detach().float().contiguous() for t in (*norm1[:2], *norm2[:2])]
        self._keep = (norms, matrices)  # what the struct points into
        self._struct = _BlockWeights(
            *(t.data_ptr() for t in norms),
            norm1[2],
            norm2[2],
            *((ctypes.c_void_p * 4)(*column) for column in zip(*(m._pointers for m in matrices), strict=True)),
        )  # the matrices' (tiles, scale, bias) pointers, as the struct's three arrays
        self._address = ctypes.addressof(self._struct)

    def work_floats(self, capacity: int) -> int:
        """The float32 scratch a step needs for a cache of `capacity` positions."""
        return int(self._work(self.emb_dim, self.heads, self.hidden, capacity))

    def __call__(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: int, work: torch.Tensor) -> None:
        """`x`: the token's residual row [d], updated in place; `keys`, `values`: this layer's cache [heads,
        capacity, head_dim], position `pos` written; all contiguous float32, `work` of `work_floats(capacity)`."""
        capacity = keys.shape[1]
        self._fn(
            self._address,
            x.data_ptr(),
            keys.data_ptr(),
            values.data_ptr(),
            pos,
            capacity,
            self.emb_dim,
            self.heads,
            self.hidden,
            work.data_ptr(),
            torch.get_num_threads(),
        )


def _library_or_raise() -> _Library:
    library = _library() if enabled() else None
    if library is None:
        raise RuntimeError(f"gpt2term's kernels are not available: {why_not()}")
    return library
