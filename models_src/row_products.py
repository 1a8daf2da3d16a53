"""Fable's own kernels for decoding on a CPU (``row_products.c``), built for the machine.

A decoding step multiplies one row, or a few, by every weight matrix; MKL leaves such a
product on one core and short of the caches' speed (the step's products took ~2-3x what the
C kernels here do), and around the products a block's ~25 small torch calls cost more than
their arithmetic. So ``RowProduct`` runs one product (packed weights, float32 or int8), and
``GPTStep`` a GPT's whole one-token step in one call (benchmarks/README.md,
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
    """row_products.c's Block: a GPT block's parameters."""
    _fields_ = [("ln1_weight", ctypes.c_void_p), ("ln1_bias", ctypes.c_void_p),
                ("ln2_weight", ctypes.c_void_p), ("ln2_bias", ctypes.c_void_p),
                ("ln1_eps", ctypes.c_float), ("ln2_eps", ctypes.c_float),
                ("qkv", Linear), ("proj", Linear), ("fc", Linear), ("mlp", Linear),
                ("heads", ctypes.c_int), ("gelu", ctypes.c_int)]


class Model(ctypes.Structure):
    """row_products.c's Model: a GPT's blocks, final layer norm and head for ``gpt_one_token``."""
    _fields_ = [("blocks", ctypes.POINTER(Block)), ("layers", ctypes.c_int),
                ("ln_weight", ctypes.c_void_p), ("ln_bias", ctypes.c_void_p), ("ln_eps", ctypes.c_float),
                ("head", Linear)]


GELU = {"none": 2, "tanh": 3}  # row_products.c's GELU_ERF and GELU_TANH, by F.gelu's approximate


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    signatures = {
        "row_products_tile": ([], integer),
        "row_product": ([ctypes.POINTER(Linear), integer, pointer, pointer, integer], None),
        "gpt_one_token": ([ctypes.POINTER(Model), integer] + [pointer] * 5 + [integer] * 2 + [pointer, integer],
                          None),
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


class GPTStep:
    """A GPT's one-token step in one call (``gpt_one_token``): from the embedded rows to the
    logits, the same operations as the module path in eval mode (``Block.forward`` for
    each block, ``ln_f``, ``lm_head``), from the products ``RowProduct`` made (the blocks'
    four each, then the head) and the layer norms' parameters."""

    def __init__(self, lib: ctypes.CDLL, blocks: list[tuple[list[RowProduct], torch.nn.LayerNorm,
                                                               torch.nn.LayerNorm]],
                 ln_f: torch.nn.LayerNorm, head: RowProduct, heads: int, approximate: str):
        width = blocks[0][0][1].linear.out
        if width % heads or width // heads > MAX_HEAD_DIM:  # the kernel keeps a head's sums on its stack
            raise ValueError(f"heads of at most {MAX_HEAD_DIM} dimensions, not {width} / {heads}")
        self.lib, self.parts = lib, (blocks, ln_f, head)  # what the pointers point into
        array = (Block * len(blocks))()
        for i, (products, ln_1, ln_2) in enumerate(blocks):
            norms = [_pointer(t) for ln in (ln_1, ln_2) for t in (ln.weight, ln.bias)]
            array[i] = Block(*norms, ln_1.eps, ln_2.eps, *(p.linear for p in products), heads, GELU[approximate])
        self.model = Model(array, len(blocks), _pointer(ln_f.weight), _pointer(ln_f.bias), ln_f.eps, head.linear)
        self.array = array
        self.width, self.vocab, self.heads = width, head.linear.out, heads
        hidden = blocks[0][0][2].linear.out
        self.scratch = 7 * width + hidden

    def __call__(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
        """Logits (rows, vocab) for embedded rows x (rows, C) whose tokens take
        ``positions`` (int32, one each, each below the storage's positions: a KVCache's);
        ``keys`` and ``values`` are the cache's whole storage (layers, rows or more, heads,
        positions, head dim), where the tokens' keys and values are written."""
        rows = x.size(0)
        if (x.dim() != 2 or x.size(1) != self.width or x.dtype != torch.float32
                or keys.dim() != 5 or keys.size(0) != self.model.layers or keys.size(1) < rows
                or keys.size(2) != self.heads or keys.size(2) * keys.size(4) != self.width
                or keys.dtype != torch.float32 or keys.is_cuda
                or not (keys.is_contiguous() and values.is_contiguous() and keys.shape == values.shape)
                or positions.dtype != torch.int32 or positions.shape != (rows,) or not positions.is_contiguous()):
            raise ValueError("a one-token step: the rows and the cache do not match the model")
        x = x.contiguous()
        logits, scratch = torch.empty(rows, self.vocab), torch.empty(rows * self.scratch)
        self.lib.gpt_one_token(self.model, rows, x.data_ptr(), logits.data_ptr(), scratch.data_ptr(),
                               keys.data_ptr(), values.data_ptr(), keys.size(1), keys.size(3),
                               positions.data_ptr(), torch.get_num_threads())
        return logits
