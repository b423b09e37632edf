"""4-bit quantization from scratch: NF4/FP4 codebooks, blockwise absmax, double quantization.

A weight tensor is cut into blocks of ``blocksize`` consecutive values (row-major order). Each
block is divided by its absolute maximum ``absmax``, so its values land in [-1, 1], and every value
is replaced by the index of the nearest entry of a 16-entry *codebook*: 4 bits per weight plus one
float32 ``absmax`` per block (4 + 32/64 = 4.5 bits at blocksize 64). Dequantizing is a table
look-up times the block's absmax.

*Double quantization* (QLoRA) stores the absmax values themselves in 8 bits: subtract their mean,
quantize them in blocks of 256 with an 8-bit code, and keep one float32 per 256 blocks
(4 + 8/64 + 32/(64·256) ≈ 4.127 bits). `course_lib.linear4bit.Linear4bit` holds such a weight and
dequantizes it on the fly; a LoRA branch beside it trains while the 4-bit weight stays frozen,
which is QLoRA.

Everything here reproduces bitsandbytes (``bitsandbytes.functional.quantize_4bit``,
``dequantize_4bit``, ``compress_statistics=True``) bit for bit on CPU. What a reader must know of
its conventions:

* **Nibble order**: two 4-bit codes per byte, the *first* value of each pair in the *high* nibble.
* **Ragged tail**: when ``numel`` is not a multiple of ``blocksize`` the last block is shorter
  and gets its own absmax (the same as padding it with zeros); an odd ``numel`` gets one padding
  code (the code of 0.0) in the low nibble of the last byte.
* **Rounding**: a value exactly halfway between two codebook entries goes to the lower one.
* **Double quantization** uses bitsandbytes' signed 8-bit *dynamic* code (`dynamic_codebook`)
  on ``absmax - mean(absmax)`` in blocks of 256. bitsandbytes' CPU kernel first snaps each scaled
  value onto a grid of 65536 points in [-1, 1] and takes the code entry nearest that grid point;
  its CUDA kernel takes the entry nearest the value itself. We do the same on each device, so
  about 0.2% of the 8-bit absmax codes differ between the two devices (by one step).
* **FP4** is bitsandbytes' own 4-bit float (see `fp4_codebook`), not exactly OCP's E2M1.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NF4_OFFSET = 0.9677083
"""Outermost NF4 quantile: QLoRA's 1 - (1/30 + 1/32)/2 = 0.96770833..., written with 7 decimals as
bitsandbytes does (the rounding moves the levels by < 3e-7 and makes them bit-identical to its table)."""

QUANT_TYPES = ("nf4", "fp4", "int4", "int8")
FOUR_BIT_TYPES = ("nf4", "fp4", "int4")
ABSMAX_BLOCKSIZE = 256  # block size of the second-level (double) quantization, as in QLoRA


# ---------------------------------------------------------------------------------------------
# Codebooks: the value each code stands for, in [-1, 1]
# ---------------------------------------------------------------------------------------------
def nf4_codebook(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NormalFloat4 levels, sorted, as float32 (code ``i`` means ``nf4_codebook()[i]``).

    Quantiles of N(0, 1): 8 positive levels at probabilities evenly spaced over [offset, 0.5]
    (without 0.5 itself), 7 negative ones from the same construction with 8 points, and an exact 0,
    all divided by the largest so the range is [-1, 1]. The asymmetry buys an exact zero.
    """
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    # The probabilities are float32 (as bitsandbytes builds them), the inverse CDF float64.
    positive = normal.icdf(torch.linspace(offset, 0.5, 9)[:-1].double())
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8)[:-1].double())
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float().sort().values
    return levels / levels.max()


def fp4_codebook() -> torch.Tensor:
    """bitsandbytes' 4-bit float, indexed by code: bit 3 is the sign, bits 2-1 the exponent ``e``, bit 0 the mantissa ``m``.

    Magnitude ``(1 + m/2) · 2^(4 - e)`` for ``e > 0`` (so ``e = 01`` is the *largest* binade: 8, 12)
    and the subnormal ``m / 16`` for ``e = 0``; divided by the largest, 12. The normal values
    {1/6, 1/4, 1/3, 1/2, 2/3, 1} are OCP E2M1's {1, 1.5, 2, 3, 4, 6}/6, but bitsandbytes' one
    subnormal is 1/192 where E2M1 has 1/12. Codes 0 and 8 are +0 and -0.
    """
    values = []
    for sign, exponent, mantissa in itertools.product((1, -1), range(4), range(2)):
        magnitude = mantissa / 16 if exponent == 0 else (1 + mantissa / 2) * 2 ** (4 - exponent)
        values.append(sign * magnitude)
    table = torch.tensor(values, dtype=torch.float32)
    return table / table.abs().max()


def int4_codebook() -> torch.Tensor:
    """Symmetric INT4 in sign-magnitude, indexed by code: code ``s·8 + k`` means ``(-1)^s · k / 7`` (15 levels, ±0)."""
    k = torch.arange(8, dtype=torch.float32) / 7
    return torch.cat([k, -k])


def int8_codebook() -> torch.Tensor:
    """Symmetric INT8 absmax: code ``k`` (0..254) means ``(k - 127) / 127``; 255 is unused."""
    return torch.cat([torch.arange(-127, 128, dtype=torch.float32) / 127, torch.ones(1)])


def dynamic_codebook() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (256 sorted values) used by double quantization.

    Dynamic tree quantization (Dettmers 2016): for ``i = 0..6`` the ``2^i`` midpoints of
    ``linspace(0.1, 1, 2^i + 1)`` scaled by ``10^(i - 6)``, each with both signs, plus 0 and 1.
    Small magnitudes get many levels (down to 5.5e-7), large ones a linear grid of step ~0.014.
    """
    values = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2
        values += (10 ** (i - 6) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()
    return torch.tensor(sorted(values + [0.0, 1.0]), dtype=torch.float32)


_CODEBOOKS = {"nf4": nf4_codebook, "fp4": fp4_codebook, "int4": int4_codebook, "int8": int8_codebook,
              "dynamic": dynamic_codebook}


def codebook(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The codebook of ``quant_type`` (one of `QUANT_TYPES`) on ``device``, indexed by code."""
    check_quant_type(quant_type, QUANT_TYPES)
    return _cached_codebook(quant_type, torch.device(device))


@functools.cache
def _cached_codebook(name: str, device: torch.device) -> torch.Tensor:
    return _CODEBOOKS[name]().to(device)


@functools.cache
def _encoder(quant_type: str, device: torch.device) -> tuple[list[float], torch.Tensor | None]:
    """Midpoints between neighbouring levels, sorted, and the code of each sorted level (None: the identity)."""
    levels, order = _CODEBOOKS[quant_type]().sort(stable=True)  # stable: FP4's +0 (code 0) before -0 (code 8)
    midpoints = ((levels[:-1] + levels[1:]) / 2).tolist()  # float32 values, exact as Python floats
    identity = torch.equal(order, torch.arange(len(order)))
    return midpoints, None if identity else order.to(torch.uint8).to(device)


@functools.cache
def _byte_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """What each byte of ``packed`` stands for, indexed by the byte: for a 4-bit type its two
    values (high nibble first) stored as one 8-byte complex64 word, so that one 1-D gather
    (``index_select``) fetches both; for ``"int8"`` the codebook itself. 256 entries, 2 KiB: it
    stays in the core's L1 cache, also in a training step whose matmuls have just evicted
    everything else (a 65536-entry table of four values per two bytes, 1 MiB, halves the look-ups
    but made a SmolLM2 step's dequantizing on CPU 1.8 times as slow for that reason)."""
    code = _cached_codebook(quant_type, device)
    if quant_type == "int8":
        return code
    byte = torch.arange(256, device=device)
    return torch.stack([code[byte >> 4], code[byte & 15]], dim=1).view(torch.complex64).view(-1)


@contextlib.contextmanager
def _one_thread():
    """Run on one CPU thread (torch's setting is process-wide; restored on exit). Our ops are small
    or cache-sized: with two threads they ran up to 2x faster on an idle machine, but 50-100x slower
    while another process kept the cores busy (each op waits for a descheduled thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Blockwise absmax quantization
# ---------------------------------------------------------------------------------------------
@dataclass
class QuantState:
    """A quantized tensor: its codes plus everything needed to dequantize it.

    ``packed`` holds two 4-bit codes per byte (or one 8-bit code for ``"int8"``). ``absmax`` is one
    float32 per block, or, with double quantization, one uint8 code of the `dynamic_codebook` per
    block, decoded as ``code[absmax] · absmax_absmax[block // 256] + absmax_offset``.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    absmax_offset: torch.Tensor | None = None  # float32 scalar: mean(absmax), subtracted first
    absmax_absmax: torch.Tensor | None = None  # float32, one per 256 absmax values

    @property
    def double_quant(self) -> bool:
        return self.absmax_offset is not None

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors (the codebooks are constants of the format, not counted)."""
        stored = (self.packed, self.absmax, self.absmax_offset, self.absmax_absmax)
        return sum(t.numel() * t.element_size() for t in stored if t is not None)

    @property
    def numel(self) -> int:
        return self.shape.numel()


def quantize_blockwise(tensor: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                       double_quant: bool = False) -> QuantState:
    """Blockwise absmax quantization of any floating-point tensor (flattened row-major).

    Returns a `QuantState`; `dequantize_blockwise` inverts it up to rounding. ``quant_type`` is one
    of `QUANT_TYPES`; ``blocksize`` a power of two >= 2; ``double_quant`` also quantizes the absmax
    values to 8 bits (QLoRA). A ``numel`` that is not a multiple of ``blocksize`` is fine: the last
    block is shorter, as in bitsandbytes. A parameter that requires grad (``layer.weight``) is
    quantized as ``tensor.detach()``: quantization has no gradient, and the state holds no graph.
    """
    check_quant_type(quant_type, QUANT_TYPES)
    check_blocksize(blocksize)
    check_tensor(tensor)
    tensor = tensor.detach()
    packed, absmax = _encode(tensor, quant_type, blocksize)
    state = QuantState(packed, absmax, tensor.shape, tensor.dtype, blocksize, quant_type)
    if double_quant:  # the mean at torch's usual thread count, as bitsandbytes (a parallel sum rounds differently)
        state.absmax_offset = absmax.mean()
        state.absmax, state.absmax_absmax = _quantize_dynamic(absmax - state.absmax_offset)
    return state


@_one_thread()
def _encode(tensor: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes, float32 absmax per block), in cache-sized slices of blocks."""
    n = tensor.numel()
    blocks = _padded_blocks(tensor.reshape(-1), blocksize)
    absmax = torch.empty(len(blocks), dtype=torch.float32, device=tensor.device)
    codes = torch.empty(blocks.shape, dtype=torch.uint8, device=tensor.device)
    midpoints, order = _encoder(quant_type, tensor.device)
    for rows in _slices(blocks):
        chunk = blocks[rows].float()
        low, high = torch.aminmax(chunk, dim=1)
        absmax[rows] = torch.maximum(high, -low)  # = max |x|, without an |x| copy; NaN propagates
        if not torch.isfinite(absmax[rows]).all():
            bad = (~torch.isfinite(tensor)).sum().item()
            raise ValueError(f"tensor holds {bad} NaN or inf value(s) of {n}; one would spoil its whole block's "
                             "absmax. Fix the weights first (e.g. reload the checkpoint or find where training "
                             "diverged)")
        scaled = chunk * (1.0 / absmax[rows].clamp(min=1e-38)).unsqueeze(1)  # in [-1, 1]
        codes[rows] = _nearest_level(scaled, midpoints)
    if order is not None:  # FP4 and INT4 codes are not in value order
        codes = order[codes.long()]
    codes = codes.view(-1)
    if quant_type == "int8":  # one code per byte (a copy, so no padding stays allocated)
        packed = codes[:n].clone() if n < codes.numel() else codes
    else:  # two codes per byte, the first in the high nibble; an odd numel leaves a padding code
        pairs = codes[: n + n % 2].view(-1, 2)
        packed = (pairs[:, 0] << 4) | pairs[:, 1]
    return packed, absmax


def _nearest_level(scaled: torch.Tensor, midpoints: list[float]) -> torch.Tensor:
    """Index (uint8) of the nearest sorted level: the number of midpoints strictly below the value.

    Ties (a value exactly on a midpoint) go to the lower level, as in bitsandbytes. The plain way is
    one comparison per midpoint, ``sum(scaled > m for m in midpoints)`` (15 passes over the values
    for 4 bits). `_grid_guess` cuts [-1, 1] into cells so fine that a value's cell and its two
    neighbours hold at most one midpoint: a table gives, per cell, the count of midpoints left of its
    left neighbour, and one comparison with the next midpoint completes it. Same result, ~3x faster.
    """
    if len(midpoints) > 15:
        return torch.bucketize(scaled, torch.tensor(midpoints, device=scaled.device)).to(torch.uint8)
    guess = _grid_guess(tuple(midpoints), scaled.device)
    if guess is None:  # levels too close for the grid: compare with every midpoint
        count = torch.zeros(scaled.shape, dtype=torch.uint8, device=scaled.device)
        for midpoint in midpoints:
            count += scaled > midpoint
        return count
    below, next_midpoint = guess
    cell = torch.add(_GRID_HALF, scaled, alpha=_GRID_HALF).to(torch.int32).view(-1)  # (s + 1) · half, truncated
    count = below.index_select(0, cell)  # midpoints certainly below the value (a cell of rounding spare)
    count += scaled.view(-1) > next_midpoint.index_select(0, count)  # the one midpoint that may be too
    return count.to(torch.uint8).view(scaled.shape)


_GRID_HALF = 2048  # cells of width 1 / 2048 over [-1, 1]


@functools.cache
def _grid_guess(midpoints: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For `_nearest_level`: per grid cell ``g`` (value ``s`` lands in cell ``trunc((s + 1) · half)``,
    up to one cell off by rounding), the number of midpoints below the left edge of cell ``g - 1``,
    and the midpoints with +inf appended. Exact when three cells never hold two midpoints; None
    otherwise (then the caller compares with every midpoint)."""
    mids = torch.tensor(midpoints, dtype=torch.float64)
    if len(mids) > 1 and (mids[1:] - mids[:-1]).min() <= 3 / _GRID_HALF:
        return None
    cells = 2 * _GRID_HALF + 2  # s = 1 (or a rounding above it) lands in cell 2·half; one cell spare
    left_of_previous = torch.arange(cells, dtype=torch.float64) / _GRID_HALF - 1 - 1 / _GRID_HALF
    below = torch.searchsorted(mids, left_of_previous, right=False).to(torch.int32)  # count of m < edge
    next_midpoint = torch.cat([mids.float(), torch.tensor([float("inf")])])
    return below.to(device), next_midpoint.to(device)


@torch.no_grad()
@_one_thread()
def dequantize_blockwise(state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensor a `QuantState` stands for: ``codebook[code] · absmax`` of its block, in ``dtype``
    (default: the dtype it was quantized from). The products are computed in float32; the result
    never requires grad, even if a hand-built state holds tensors that do.

    Two passes over the output: one look-up per byte of codes in a 256-entry table of what that
    byte stands for (`_byte_table`: two values for the 4-bit types), written straight into the
    output, then one in-place multiply by each block's absmax. Chapter 02 writes the same with the
    nibbles unpacked one by one, the readable form, and checks both give the same tensor."""
    check_float_dtype(dtype, "dtype")
    dtype = dtype or state.dtype
    n, bs = state.numel, state.blocksize
    absmax = dequantize_absmax(state)
    flat = torch.empty(absmax.numel() * bs, dtype=torch.float32, device=state.packed.device)
    table = _byte_table(state.quant_type, flat.device)
    written = state.packed.numel() * (table.element_size() // 4)  # values: 2 per byte (4-bit), 1 (int8)
    _gather_bytes(table, state.packed, flat[:written].view(table.dtype))
    if written < flat.numel():
        flat[written:].zero_()  # the last block's padding, cut off below
    blocks = flat.view(-1, bs)
    if dtype == torch.float32:
        out = blocks.mul_(absmax.unsqueeze(1))
    else:  # computed in float32, rounded once to dtype
        out = torch.mul(blocks, absmax.unsqueeze(1), out=torch.empty(blocks.shape, dtype=dtype, device=blocks.device))
    return (out.view(-1)[:n] if out.numel() != n else out).view(state.shape)


_GATHER_CHUNK = 1 << 20  # bytes of codes widened to indices at a time on CPU (4 MiB of int32)


def _gather_bytes(table: torch.Tensor, packed: torch.Tensor, out: torch.Tensor) -> None:
    """``out[i] = table[packed[i]]``. ``index_select`` takes int32 or int64 indices, not bytes, so
    the codes are widened first: in one go for up to `_GATHER_CHUNK` bytes (and on a GPU), and above
    that on CPU a chunk at a time into one reused buffer (a whole 4096 x 4096 weight's indices would
    be a fresh 32 MiB, which the allocator maps from the operating system page by page on every
    call). Every operation counts: inside a training step each costs tens of microseconds however
    small, as the matmuls between two calls have evicted the caches."""
    if packed.device.type != "cpu" or packed.numel() <= _GATHER_CHUNK:
        torch.index_select(table, 0, packed.int(), out=out)
        return
    chunk = _GATHER_CHUNK
    index = torch.empty(chunk, dtype=torch.int32, device=packed.device)
    for start in range(0, packed.numel(), chunk):
        stop = min(start + chunk, packed.numel())
        torch.index_select(table, 0, index[: stop - start].copy_(packed[start:stop]), out=out[start:stop])


def _slices(blocks: torch.Tensor, values_per_slice: int = 1 << 16) -> list[slice]:
    """Row ranges of ``blocks`` of about ``values_per_slice`` values, so that on CPU every
    intermediate stays in cache (about 2x faster than whole-tensor ops); one range on GPUs."""
    rows = len(blocks) if blocks.device.type != "cpu" else max(1, values_per_slice // blocks.shape[1])
    return [slice(start, min(start + rows, len(blocks))) for start in range(0, len(blocks), rows)]


def dequantize_absmax(state: QuantState) -> torch.Tensor:
    """The per-block float32 absmax, decoding the 8-bit codes first under double quantization:
    ``code[c] · absmax_absmax[i // 256] + absmax_offset`` for the ``i``-th code ``c`` (a multiply,
    then an add, each rounded to float32, as bitsandbytes computes it)."""
    if not state.double_quant:
        return state.absmax
    values = torch.index_select(_cached_codebook("dynamic", state.absmax.device), 0, state.absmax.int())
    whole = values.numel() // ABSMAX_BLOCKSIZE * ABSMAX_BLOCKSIZE  # the codes in full blocks of 256
    values[:whole].view(-1, ABSMAX_BLOCKSIZE).mul_(state.absmax_absmax[: whole // ABSMAX_BLOCKSIZE].unsqueeze(1))
    if whole < values.numel():  # the last, shorter block
        values[whole:].mul_(state.absmax_absmax[-1])
    return values.add_(state.absmax_offset)


@_one_thread()
def _quantize_dynamic(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit dynamic-code blockwise quantization (blocks of 256): (uint8 codes, float32 absmax)."""
    blocks = _padded_blocks(values, ABSMAX_BLOCKSIZE)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).view(-1)[: values.numel()]
    if values.device.type == "cpu":  # bitsandbytes' CPU kernel: snap onto 65536 grid points first
        codes = _nearest_on_grid()[((scaled.clamp(-1, 1) + 1) * 0.5 * 65535 + 0.5).long()]
    else:  # bitsandbytes' CUDA kernel: the nearest code
        code = _cached_codebook("dynamic", values.device)
        codes = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2)
    codes = _padded_blocks(codes, ABSMAX_BLOCKSIZE)
    codes[absmax == 0] = 0  # an all-zero block (e.g. a single 4-bit block): code 0, as both kernels give
    return codes.view(-1)[: values.numel()].to(torch.uint8), absmax


@functools.cache
def _nearest_on_grid() -> torch.Tensor:
    """bitsandbytes' CPU look-up table: for 65536 evenly spaced points in [-1, 1], the nearest `dynamic_codebook` entry."""
    code = dynamic_codebook()
    grid = -1 + 2 * torch.arange(65536, dtype=torch.float32) / 65535
    return torch.bucketize(grid, (code[:-1] + code[1:]) / 2)


def _padded_blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``flat`` as rows of ``blocksize``, the last row padded with zeros (which leave absmax unchanged)."""
    short = -flat.numel() % blocksize
    return (F.pad(flat, (0, short)) if short else flat).view(-1, blocksize)


def bits_per_parameter(state: QuantState) -> float:
    """Storage cost per weight, from the sizes of the tensors actually stored: ``8 · bytes / numel``.

    NF4 at blocksize 64: 4 + 32/64 = 4.5; with double quantization 4 + 8/64 + 32/(64·256) ≈ 4.127
    (plus the 4-byte offset, negligible for a real layer).
    """
    return 8 * state.nbytes / state.numel


# ---------------------------------------------------------------------------------------------
# Input checks: each error says what to do
# ---------------------------------------------------------------------------------------------
def check_quant_type(quant_type: str, valid: tuple[str, ...]) -> None:
    """Refuse a ``quant_type`` that is not one of ``valid``."""
    if quant_type not in valid:
        raise ValueError(f"unknown quant_type {quant_type!r}; choose one of {', '.join(map(repr, valid))}")


def check_blocksize(blocksize) -> None:
    """Refuse a block size that is not a power of two >= 2 (an int, not a bool)."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 2 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two >= 2 (QLoRA uses 64), got {blocksize!r}")


def check_float_dtype(dtype, name: str = "compute_dtype") -> None:
    """Refuse a ``dtype`` that is neither None nor a floating-point ``torch.dtype``."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{name} must be a floating-point torch.dtype such as torch.float32 or "
                        f"torch.bfloat16 (or None for the default), got {dtype!r}")


def check_tensor(tensor: torch.Tensor) -> None:
    """Refuse a tensor that cannot be quantized: not floating-point, or empty."""
    if not tensor.is_floating_point():
        raise TypeError(f"can only quantize floating-point tensors, got {tensor.dtype}; convert with .float() first")
    if tensor.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
