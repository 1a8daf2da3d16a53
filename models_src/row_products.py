"""Fable's own products for decoding on a CPU (``row_products.c``), built for the machine.

A decoding step multiplies one row, or a few, by every weight matrix; MKL leaves such a
product on one core and short of the caches' speed, so the step's products take ~3x what
the C kernels here do (benchmarks/README.md, "Generation against llama.cpp"). The kernels are
plain C: on first use they are compiled with this machine's C compiler (``$CC``, else
``cc``) for its CPU (``-march=native``), OpenMP when the compiler has it, into
``$XDG_CACHE_HOME/fable/kernels`` (default ``~/.cache``), named by the source, the
flags and the CPU, so that a library is built once per machine and never loaded on a CPU
it was not built for. Where no library can be built (no compiler), ``library()`` is None
and the decode path keeps torch's products: the same numbers to ~1e-6, slower.

The threads are torch's (``torch.get_num_threads()``, OpenMP's pool that torch already
loaded, shared by soname), so a server's thread setting holds for these products too.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("row_products.c")
# OpenMP where the compiler has it (gcc, clang with libomp), else the same code on one thread
_FLAG_SETS = (["-O3", "-march=native", "-shared", "-fPIC", "-fopenmp", "-lm"],
              ["-O3", "-march=native", "-shared", "-fPIC", "-fopenmp-simd", "-lm"])

_lock = threading.Lock()
_loaded: list = []  # [library or None] once tried: one build attempt per process


def library() -> ctypes.CDLL | None:
    """The kernels' library for this machine, built on first call; None where it can't be."""
    with _lock:
        if not _loaded:
            _loaded.append(load())
        return _loaded[0]


def load(cache_dir: Path | None = None, compiler: str | None = None) -> ctypes.CDLL | None:
    """Loads the library from ``cache_dir`` (building it there first if need be)."""
    compiler = compiler or os.environ.get("CC") or "cc"
    cache_dir = cache_dir or _cache_dir()
    errors = []
    for flags in _FLAG_SETS:
        key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, *flags, _cpu()]).encode())
        path = cache_dir / f"row_products-{key.hexdigest()[:16]}.so"
        if not path.exists():
            error = _build(compiler, flags, path)
            if error:
                errors.append(error)
                continue
        try:
            return _declare(ctypes.CDLL(str(path)))
        except OSError as error:
            errors.append(str(error))
    log.warning("decoding keeps torch's products (slower): Fable's kernels could not be "
                "built with %r: %s", compiler, errors[0][-500:] if errors else "")
    return None


def _cache_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fable" / "kernels"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        return cache
    except OSError:  # a read-only home: a folder of one's own under the temporary directory
        fallback = Path(tempfile.gettempdir()) / f"fable-kernels-{os.getuid()}"
        fallback.mkdir(mode=0o700, exist_ok=True)
        return fallback


def _cpu() -> str:
    """What -march=native builds for: the machine and its CPU's feature flags."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = platform.processor()
    return platform.machine() + " " + flags


def _build(compiler: str, flags: list[str], path: Path) -> str | None:
    """Compiles into ``path`` (whole or not at all: several workers may build at once);
    the compiler's complaint, or None."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    try:
        done = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(partial)],
                              capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as error:
        return str(error)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        return done.stderr or f"{compiler} exited with {done.returncode}"
    os.replace(partial, path)
    log.info("built Fable's decoding kernels for this CPU: %s", path)
    return None


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    for name in ("row_products_f32", "row_products_i8"):
        function = getattr(lib, name)
        function.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 5 + [ctypes.c_int] * 3
        function.restype = None
    lib.row_products_tile.restype = ctypes.c_int
    lib.attend_one_token.argtypes = ([ctypes.c_int] * 3 + [ctypes.c_void_p] * 3 + [ctypes.c_int] * 2
                                     + [ctypes.c_void_p, ctypes.c_int])
    lib.attend_one_token.restype = None
    return lib


class RowProduct:
    """``x -> F.linear(x, weight, bias)`` for float32 CPU rows (N, in), by the library,
    from nn.Linear's (out, in) weight; with ``int8``, the weight rounded to 8 bits per
    output row (symmetric, a float scale each) and the rows kept in float32."""

    def __init__(self, lib: ctypes.CDLL, weight: torch.Tensor, bias: torch.Tensor | None,
                 int8: bool = False):
        weight = weight.detach().float()
        self.out, self.inputs = weight.shape
        tile = lib.row_products_tile()
        padded = -(-self.out // tile) * tile
        self.scale = None
        if int8:
            scale = (weight.abs().amax(dim=1) / 127).clamp_min(1e-12)
            weight = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
            self.scale = _padded(scale, padded)
        self.function = lib.row_products_i8 if int8 else lib.row_products_f32
        # [out / tile][in][tile]: each tile of output columns one contiguous stream
        columns = torch.zeros(self.inputs, padded, dtype=weight.dtype)
        columns[:, :self.out] = weight.t()
        self.packed = columns.view(self.inputs, padded // tile, tile).transpose(0, 1).contiguous()
        self.bias = None if bias is None else _padded(bias.detach().float(), padded)
        self.pointers = [t.data_ptr() if t is not None else None
                         for t in (self.packed, self.bias, self.scale)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.size(1) != self.inputs or x.dtype != torch.float32 or x.is_cuda:
            raise ValueError(f"rows of {self.inputs} float32 on the CPU expected, not {tuple(x.shape)} {x.dtype}")
        x = x.contiguous()
        y = torch.empty(x.size(0), self.out)
        weight, bias, scale = self.pointers
        self.function(x.size(0), x.data_ptr(), weight, bias, scale, y.data_ptr(),
                      self.inputs, self.out, torch.get_num_threads())
        return y


def _padded(values: torch.Tensor, length: int) -> torch.Tensor:
    return torch.cat([values.float(), values.new_zeros(length - values.numel(), dtype=torch.float32)])


MAX_HEAD_DIM = 256  # row_products.c's MAX_DIM: a head's sums are kept on the stack


def attend_one_token(lib: ctypes.CDLL, qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     position: int) -> torch.Tensor:
    """``KVCache.attend`` of a one-token step with every row at ``position``: the token's
    key and value (in ``qkv`` (rows, 3C)) stored into a layer's ``keys`` and ``values``
    storage (rows or more, heads, positions, head dim; contiguous float32), and its attention
    over positions 0..position, (rows, C)."""
    rows, heads, dim = qkv.size(0), keys.size(1), keys.size(3)
    if (qkv.dtype != torch.float32 or qkv.size(1) != 3 * heads * dim or keys.size(0) < rows
            or not 0 <= position < keys.size(2) or dim > MAX_HEAD_DIM
            or keys.dtype != torch.float32 or keys.is_cuda
            or not (keys.is_contiguous() and values.is_contiguous() and keys.shape == values.shape)):
        raise ValueError("attend_one_token: qkv and the cache do not match")
    qkv = qkv.contiguous()
    y = torch.empty(rows, heads * dim)
    lib.attend_one_token(rows, heads, dim, qkv.data_ptr(), keys.data_ptr(), values.data_ptr(),
                         keys.size(2), position, y.data_ptr(), torch.get_num_threads())
    return y
