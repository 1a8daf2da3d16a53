"""Fable's own kernels for decoding on a CPU (``row_products.c``), built for the machine.

A decoding step multiplies one row, or a few, by every weight matrix; MKL leaves such a
product on one core and short of the caches' speed (the step's products took ~2-3x what the
C kernels here do), and around the products a block's ~25 small torch calls cost more than
their arithmetic. So ``RowProduct`` runs one product (packed weights, float32 or int8), and
``BlockStep`` a GPT block's whole one-token step in one call (benchmarks/README.md,
"Generation against llama.cpp"). The kernels are plain C: on first use they are compiled
with this machine's C compiler (``$CC``, else ``cc``) for its CPU (``-march=native``),
OpenMP when the compiler has it, into ``$XDG_CACHE_HOME/fable/kernels`` (default
``~/.cache``), named by the source, the flags and the CPU, so that a library is built once
per machine and never loaded on a CPU it was not built for. Where no library can be built
(no compiler), ``library()`` is None and the decode path keeps torch's operators: the same
numbers to ~1e-5, slower.

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


class Linear(ctypes.Structure):
    """row_products.c's Linear: a packed weight and what finishes its sums."""
    _fields_ = [("weight", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                ("inputs", ctypes.c_int), ("out", ctypes.c_int), ("int8", ctypes.c_int)]


class Block(ctypes.Structure):
    """row_products.c's Block: a GPT block's parameters for ``block_one_token``."""
    _fields_ = [("ln1_weight", ctypes.c_void_p), ("ln1_bias", ctypes.c_void_p),
                ("ln2_weight", ctypes.c_void_p), ("ln2_bias", ctypes.c_void_p),
                ("ln1_eps", ctypes.c_float), ("ln2_eps", ctypes.c_float),
                ("qkv", Linear), ("proj", Linear), ("fc", Linear), ("mlp", Linear),
                ("heads", ctypes.c_int), ("gelu", ctypes.c_int)]


GELU = {"none": 2, "tanh": 3}  # row_products.c's GELU_ERF and GELU_TANH, by F.gelu's approximate


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    signatures = {
        "row_products_tile": ([], integer),
        "row_product": ([ctypes.POINTER(Linear), integer, pointer, pointer, integer], None),
        "block_one_token": ([ctypes.POINTER(Block), integer] + [pointer] * 5 + [integer, pointer, integer], None),
    }
    for name, (arguments, result) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = arguments, result
    return lib


class RowProduct:
    """``x -> F.linear(x, weight, bias)`` for float32 CPU rows (N, in), by the library,
    from nn.Linear's (out, in) weight; with ``int8``, the weight rounded to 8 bits per
    output row (symmetric, a float scale each) and the rows kept in float32."""

    def __init__(self, lib: ctypes.CDLL, weight: torch.Tensor, bias: torch.Tensor | None,
                 int8: bool = False):
        self.lib = lib
        weight = weight.detach().float()
        out, inputs = weight.shape
        tile = lib.row_products_tile()
        padded = -(-out // tile) * tile
        self.scale = None
        if int8:
            scale = (weight.abs().amax(dim=1) / 127).clamp_min(1e-12)
            weight = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
            self.scale = _padded(scale, padded)
        # [out / tile][in][tile]: each tile of output columns one contiguous stream
        columns = torch.zeros(inputs, padded, dtype=weight.dtype)
        columns[:, :out] = weight.t()
        self.packed = columns.view(inputs, padded // tile, tile).transpose(0, 1).contiguous()
        self.bias = None if bias is None else _padded(bias.detach().float(), padded)
        self.linear = Linear(self.packed.data_ptr(), _pointer(self.bias), _pointer(self.scale),
                             inputs, out, int(int8))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.size(1) != self.linear.inputs or x.dtype != torch.float32 or x.is_cuda:
            raise ValueError(f"rows of {self.linear.inputs} float32 on the CPU expected, "
                             f"not {tuple(x.shape)} {x.dtype}")
        x = x.contiguous()
        y = torch.empty(x.size(0), self.linear.out)
        self.lib.row_product(self.linear, x.size(0), x.data_ptr(), y.data_ptr(), torch.get_num_threads())
        return y


def _padded(values: torch.Tensor, length: int) -> torch.Tensor:
    return torch.cat([values.float(), values.new_zeros(length - values.numel(), dtype=torch.float32)])


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


MAX_HEAD_DIM = 256  # row_products.c's MAX_DIM: a head's sums are kept on the stack


def _check_cache(rows: int, width: int, keys: torch.Tensor, values: torch.Tensor,
                 positions: torch.Tensor) -> None:
    """Shapes and types only (per layer, so no look at the values): the positions are a
    KVCache's, each below its storage's (``KVCache.begin`` makes the room)."""
    heads, dim = keys.size(1), keys.size(3)
    if (width != heads * dim or keys.size(0) < rows or dim > MAX_HEAD_DIM
            or keys.dtype != torch.float32 or keys.is_cuda
            or not (keys.is_contiguous() and values.is_contiguous() and keys.shape == values.shape)
            or positions.dtype != torch.int32 or positions.shape != (rows,) or not positions.is_contiguous()):
        raise ValueError("a block's one-token step: the rows and the cache do not match")


class BlockStep:
    """A pre-LayerNorm GPT block's one-token step in one call (``block_one_token``): the
    same operations as ``Block.forward`` in eval mode, from the block's four products (made
    by ``RowProduct``) and its layer norms."""

    def __init__(self, lib: ctypes.CDLL, products: list[RowProduct], ln_1: torch.nn.LayerNorm,
                 ln_2: torch.nn.LayerNorm, heads: int, approximate: str):
        self.lib, self.products, self.norms = lib, products, (ln_1, ln_2)
        qkv, proj, fc, mlp = (p.linear for p in products)
        params = [_pointer(t) for ln in (ln_1, ln_2) for t in (ln.weight, ln.bias)]
        self.block = Block(*params, ln_1.eps, ln_2.eps, qkv, proj, fc, mlp, heads, GELU[approximate])
        self.width, self.scratch = proj.out, 5 * proj.out + fc.out

    def __call__(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
        rows = x.size(0)
        if x.dim() != 2 or x.size(1) != self.width or x.dtype != torch.float32:
            raise ValueError(f"rows of {self.width} float32 expected, not {tuple(x.shape)} {x.dtype}")
        _check_cache(rows, self.width, keys, values, positions)
        x = x.contiguous()
        out, scratch = torch.empty(rows, self.width), torch.empty(rows * self.scratch)
        self.lib.block_one_token(self.block, rows, x.data_ptr(), out.data_ptr(), scratch.data_ptr(),
                                 keys.data_ptr(), values.data_ptr(), keys.size(2),
                                 positions.data_ptr(), torch.get_num_threads())
        return out
