"""Dense linear layers whose weight is laid out once for the device's fastest GEMM.

On CPU the weight is reordered at load into oneDNN's blocked layout (`torch.ops.mkldnn`). PyTorch's CPU
`F.linear` goes to MKL, which on this project's AMD development machine is about 2x slower at decode
shapes; measured with SmolLM2-135M's 30 layers of GEMMs on 2 cores: 48.6 ms (MKL) vs 22.9 ms (oneDNN,
packed) at 8 rows, 78.6 vs 42.5 ms at 32 rows, 2.46 vs 2.03 s at 2,048 rows. Elsewhere (CUDA, or a torch
built without oneDNN) the layer is a plain `F.linear`.

oneDNN builds (JIT-compiles) and caches one kernel per input shape, about 0.7 MiB each; with a row count
that changes every step that cache grows by hundreds of MiB. So the rows are bounded to a few shapes: up to
16 exactly, then padded to a multiple of 16 up to 256; above that, the largest multiple of 256 (at most 2,048)
runs as one piece and the rest as further pieces. 38 shapes in all; a full 2,048-token prefill step is one
GEMM per weight, without the copy that joining pieces costs (70 ms of SmolLM2-135M's 1.1 s at 2,048 rows).

Traced for Inductor (models/compiled.py), the packed GEMMs are the opaque ops
`lmkit::packed_linear` and `lmkit::packed_linear_add` (Inductor lowers oneDNN's own linear op only for weights
it has frozen as constants itself).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

# The row count the packed layout is tuned for; measured to serve 1 to 2,048 rows as well as the exact count.
_PACK_ROWS_HINT = 64
_EXACT_ROWS = 16  # row counts up to this run as they are
_ROW_STEP = 16  # above it, rows are padded to a multiple of this
_PADDED_ROWS = 256  # up to this, rows are padded; above it, inputs run in pieces:
_PIECE_STEP = 256  # of a multiple of this many rows
_MAX_PIECE = 2048  # up to this many


def padded_rows(rows: int) -> int:
    """The row count a GEMM piece of `rows` rows (see `row_pieces`) runs at on the oneDNN path."""
    return rows if rows <= _EXACT_ROWS or rows > _PADDED_ROWS else -(-rows // _ROW_STEP) * _ROW_STEP


def row_pieces(rows: int) -> list[tuple[int, int]]:
    """(start, rows) of the pieces a GEMM of `rows` rows runs in: one piece up to _PADDED_ROWS rows, else the
    largest multiple of _PIECE_STEP rows (at most _MAX_PIECE) first, and so on."""
    pieces, start = [], 0
    while rows - start > _PADDED_ROWS:
        n = min(_MAX_PIECE, (rows - start) // _PIECE_STEP * _PIECE_STEP)
        pieces.append((start, n))
        start += n
    if start < rows:
        pieces.append((start, rows - start))
    return pieces


def packs_on(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether weights for `device`/`dtype` are packed for oneDNN."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _runs_whole(rows: int) -> bool:
    """Whether a GEMM of `rows` rows is one oneDNN call on `rows` rows as they are (no padding, no pieces)."""
    return len(row_pieces(rows)) == 1 and padded_rows(rows) == rows


def _packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = x.shape[0]
    if rows > _PADDED_ROWS and len(pieces := row_pieces(rows)) > 1:
        return torch.cat([_packed_linear(x[i : i + n], weight, bias) for i, n in pieces])
    padded = padded_rows(rows)
    if padded != rows:
        x = torch.cat([x, x.new_zeros(padded - rows, x.shape[1])])
    y = torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
    return y if padded == rows else y[:rows]


def _packed_linear_add(x: torch.Tensor, residual: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    if _runs_whole(x.shape[0]):
        return torch.ops.mkldnn._linear_pointwise.binary(x.contiguous(), residual, weight, bias, "add")
    return residual + _packed_linear(x, weight, bias)


_tracing = False


def tracing() -> bool:
    """Whether a graph is being traced for Inductor (models/compiled.py)."""
    return _tracing


@contextmanager
def traced() -> Iterator[None]:
    """While tracing a graph for Inductor: the packed GEMMs are the custom ops below."""
    global _tracing
    _tracing, before = True, _tracing
    try:
        yield
    finally:
        _tracing = before


# Defined with the plain Library API rather than `torch.library.custom_op`, whose Python wrapper (output alias
# checks) costs ~4 µs a call: 0.5 ms of a batch-32 decode step's 121 GEMMs.
_lib = torch.library.Library("lmkit", "DEF")
_lib.define("packed_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_lib.define("packed_linear_add(Tensor x, Tensor residual, Tensor weight, Tensor? bias) -> Tensor")
# Looked up at call time, so a benchmark can stand in for the GEMMs (benchmark/profile_cpu_decode.py).
_lib.impl("packed_linear", lambda *args: _packed_linear(*args), "CompositeExplicitAutograd")
_lib.impl("packed_linear_add", lambda *args: _packed_linear_add(*args), "CompositeExplicitAutograd")
packed_linear = torch.ops.lmkit.packed_linear.default
packed_linear_add = torch.ops.lmkit.packed_linear_add.default


@torch.library.register_fake("lmkit::packed_linear", lib=_lib)
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.register_fake("lmkit::packed_linear_add", lib=_lib)
def _(x, residual, weight, bias):
    return torch.empty_like(residual)


class Linear:
    """y = x @ weight.T (+ bias) (+ a residual). x is [rows, in], contiguous."""

    __slots__ = ("weight", "bias", "packed")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.packed = packs_on(weight.device, weight.dtype)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_ROWS_HINT) if self.packed else weight
        self.bias = bias

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None, packed: bool) -> Linear:
        """A Linear over a weight already laid out (packed or not)."""
        lin = cls.__new__(cls)
        lin.weight, lin.bias, lin.packed = weight, bias, packed
        return lin

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            return F.linear(x, self.weight, self.bias)
        if _tracing:
            return packed_linear(x, self.weight, self.bias)
        return _packed_linear(x, self.weight, self.bias)  # eager: without the op's dispatch

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """x @ weight.T (+ bias) + residual, as one fused op where the backend has one."""
        if not self.packed:
            return residual + F.linear(x, self.weight, self.bias)
        if _tracing:
            return packed_linear_add(x, residual, self.weight, self.bias)
        return _packed_linear_add(x, residual, self.weight, self.bias)
