"""gpt2term's own matrix-vector kernels for decoding (`matvec.c`), built with the machine's C compiler on first use.

Decoding one token reads every weight once, so its speed is how fast a kernel streams the matrices. PyTorch's
kernels for one row stream them well below what the memory gives (oneDNN and MKL are built for many rows), and
fbgemm's int8 also wants 8-bit activations, which move GPT-2's greedy tokens. `matvec.c` reads float32, bf16 or
int8 weights laid out in tiles of `TILE` output columns, converts them to float32 in registers and sums in float32,
for any number of rows.

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

from gpt2term.core.accel import int8

SWITCH = "GPT2TERM_NATIVE"  # =0: PyTorch's kernels only (to compare, or where the compiler misbehaves)
SOURCE = Path(__file__).with_name("matvec.c")
TILE = 32  # output columns per tile; matvec.c's TILE, checked when the library loads
COMPILE_FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC")
BUILD_TIMEOUT_S = 120
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.int8: "i8"}
_ARGTYPES = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 4

_lock = threading.Lock()
_state: dict[str, object] = {}  # "functions" (dtype -> C function) once loaded and checked, else "why"


def enabled() -> bool:
    """False when GPT2TERM_NATIVE=0 (also "false", "off", "no")."""
    return os.environ.get(SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def available() -> bool:
    """The kernels are built, loaded and give the reference's numbers here (decided once per process)."""
    return enabled() and _functions() is not None


def supports(dtype: torch.dtype) -> bool:
    """Whether the kernels hold weights of `dtype` (float32, bf16, int8; not float16 or float64)."""
    return dtype in _SUFFIX


def why_not() -> str | None:
    """Why the kernels are not used (None when they are)."""
    if not enabled():
        return f"{SWITCH}=0"
    _functions()
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


def _functions() -> dict[torch.dtype, ctypes._CFuncPtr] | None:
    with _lock:
        if "functions" not in _state and "why" not in _state:
            try:
                functions = _load()
                why = _check(functions)
            except _Unavailable as exc:
                functions, why = None, str(exc)
            except (OSError, RuntimeError, ValueError, AttributeError) as exc:  # never worth failing a decode for
                functions, why = None, f"the kernels could not be set up: {exc}"
            if why is None:
                _state["functions"] = functions
            else:
                _state["why"] = why
        return _state.get("functions")  # type: ignore[return-value]


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


def _load() -> dict[torch.dtype, ctypes._CFuncPtr]:
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
    functions = {}
    for dtype, suffix in _SUFFIX.items():
        fn = getattr(lib, f"gpt2term_matvec_{suffix}")
        fn.argtypes, fn.restype = _ARGTYPES, None
        functions[dtype] = fn
    return functions


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
        link = ["-shared", str(objects), str(gomp), f"-Wl,-rpath,{gomp.parent}", "-o", str(partial)]
        _run_compiler([*_compiler(), *link])
        os.replace(partial, path)
    except OSError as exc:
        raise _Unavailable(f"cannot put the built kernels in {path.parent} ({exc.strerror})") from exc
    finally:
        partial.unlink(missing_ok=True)
        objects.unlink(missing_ok=True)


def _check(functions: dict[torch.dtype, ctypes._CFuncPtr]) -> str | None:
    """None when every kernel gives the reference product on shapes that reach every branch, else what failed."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(45, 37, generator=gen)  # neither a whole number of tiles nor of paired k steps
    bias = torch.randn(45, generator=gen)
    x = torch.randn(3, 37, generator=gen)  # a pair of rows and a single one
    with torch.inference_mode(False), torch.no_grad():
        for dtype in functions:
            for b in (bias, None):
                matrix = TiledMatrix(weight, b, dtype, _functions=functions)
                expected = x @ matrix.dense().t() + (0 if b is None else b)
                if not torch.allclose(matrix(x), expected, rtol=1e-5, atol=1e-5):
                    return f"the {dtype} kernel gives wrong numbers here"
    return None


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
        _functions: dict[torch.dtype, ctypes._CFuncPtr] | None = None,
    ) -> None:
        functions = _functions if _functions is not None else _functions_or_raise()
        self.dtype = dtype
        self._fn = functions[dtype]
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


def _functions_or_raise() -> dict[torch.dtype, ctypes._CFuncPtr]:
    functions = _functions() if enabled() else None
    if functions is None:
        raise RuntimeError(f"gpt2term's kernels are not available: {why_not()}")
    return functions
