"""Chapter 02's build-it exercise: quantize one block of 64 weights to NF4 by hand.

The learner writes ``nf4_quantize_block(block) -> (packed, absmax)``: ``absmax = max |block|``,
each value divided by it and replaced by the index of the nearest of the 16 NF4 levels, the 64
codes packed two per byte with the *first* value of each pair in the *high* nibble (bitsandbytes'
order). `check_nf4_quantize_block` knows the answer before it calls the learner, three ways:
bitsandbytes' ``quantize_4bit`` on CPU, a plain argmin over bitsandbytes' NF4 table, and, for two
hand-made blocks built as ``scale · level[code]``, the codes they were built from.
"""

from __future__ import annotations

import torch

from course_lib import linear4bit, quant
from course_lib.tooling.exercises import close, forbidden

BLOCKSIZE = 64
_HINT = "compute absmax, the nearest NF4 level of each value and the nibble packing with tensor operations"


def _bitsandbytes():
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # a note about an optional CPU kernel
    import bitsandbytes.functional as bnbF

    return bnbF


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """64 codes (0..15) -> 32 bytes, the first code of each pair in the high nibble."""
    codes = codes.to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2]


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).flatten().long()


def _blocks(levels: torch.Tensor) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """(description, block, codes known by construction or None), the hand-made blocks first."""
    g = torch.Generator().manual_seed(0)
    every_code = torch.arange(16).repeat(4)[torch.randperm(64, generator=g)]     # each code 4 times
    no_top = torch.randint(0, 15, (64,), generator=g)                             # codes 0..14 only
    no_top[torch.randperm(64, generator=g)[:2]] = 0                               # so -1 is the extreme
    normal = torch.randn(BLOCKSIZE, generator=g)
    small = 0.02 * torch.randn(BLOCKSIZE, generator=g)
    small[17] = 0.3                                                               # one outlier sets absmax
    return [("hand-made block 2·level[code] (absmax 2, every code four times)", 2.0 * levels[every_code], every_code),
            ("hand-made block 0.5·level[code] (its largest |value| is negative: -0.5)", 0.5 * levels[no_top], no_top),
            ("seeded N(0, 1) block", normal, None),
            ("seeded N(0, 0.02²) block with one outlier", small, None)]


def _expected(blocks, levels: torch.Tensor) -> list[tuple[torch.Tensor, float]]:
    """(packed, absmax) for each block from bitsandbytes, confirmed by an argmin and by construction."""
    bnbF = _bitsandbytes()
    out = []
    for name, block, known in blocks:
        packed, state = bnbF.quantize_4bit(block.clone(), blocksize=BLOCKSIZE, quant_type="nf4")
        packed, absmax = packed.flatten(), state.absmax.flatten()
        by_argmin = (block.unsqueeze(1) / block.abs().max() - levels).abs().argmin(dim=1)
        if not torch.equal(_pack(by_argmin), packed) or (known is not None and not torch.equal(_pack(known), packed)):
            raise RuntimeError(f"the check's own expected values disagree on the {name}; please report this")
        out.append((packed, absmax.item()))
    return out


def _diagnose(name: str, got: torch.Tensor, want: torch.Tensor, levels: torch.Tensor) -> str:
    got_codes, want_codes = _unpack(got), _unpack(want)
    swapped = torch.stack([got & 0x0F, got >> 4], dim=1).flatten().long()
    if torch.equal(swapped, want_codes):
        return (f"{name}: the codes are right but each byte has them the wrong way round: the first value "
                f"of each pair goes in the HIGH nibble, (code[0] << 4) | code[1]")
    wrong = (got_codes != want_codes).nonzero().flatten()
    i = wrong[0].item()
    return (f"{name}: {len(wrong)} of 64 codes differ; the first is value {i}: expected code "
            f"{want_codes[i].item()} (level {levels[want_codes[i]].item():+.4f}), got code {got_codes[i].item()} "
            f"(level {levels[got_codes[i].clamp(0, 15)].item():+.4f}). Divide the block by its absmax "
            f"(max |value|) and take the index of the nearest level")


def check_nf4_quantize_block(learner_fn) -> None:
    """Check ``learner_fn(block) -> (packed, absmax)`` against bitsandbytes' NF4 on four blocks of 64.

    ``packed`` must be a uint8 tensor of 32 bytes equal to bitsandbytes' ``quantize_4bit`` output and
    ``absmax`` the block's max |value|; both are computed before ``learner_fn`` runs, which runs with
    the library functions that already quantize to 4 bits turned off (they raise `ShortcutError`).
    """
    levels = _bitsandbytes().get_4bit_type("nf4", device="cpu").float()     # bitsandbytes' table, not course_lib's
    blocks = _blocks(levels)
    expected = _expected(blocks, levels)
    bnbF = _bitsandbytes()
    shortcuts = [(bnbF, "quantize_4bit"), (bnbF, "quantize_nf4"), (bnbF, "quantize_fp4"), (bnbF, "dequantize_4bit"),
                 (quant, "quantize_blockwise"), (quant, "_encode"), (quant, "_nearest_level"),
                 (quant, "dequantize_blockwise"), (linear4bit, "quantize_blockwise"),
                 (linear4bit.Linear4bit, "from_linear"), (linear4bit, "quantize_model")]
    for (name, block, _), (want_packed, want_absmax) in zip(blocks, expected):
        with forbidden(*shortcuts, hint=_HINT):
            result = learner_fn(block.clone())
        if not (isinstance(result, tuple) and len(result) == 2):
            raise AssertionError(f"{name}: return a tuple (packed, absmax), got {type(result).__name__}")
        packed, absmax = result
        if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.shape != (32,):
            raise AssertionError(f"{name}: packed must be a uint8 tensor of shape (32,) (two 4-bit codes per "
                                 f"byte), got {getattr(packed, 'dtype', type(packed).__name__)} "
                                 f"{tuple(getattr(packed, 'shape', ()))}")
        close(f"{name}: absmax (the largest |value| of the block)", float(absmax), want_absmax, atol=0, rtol=1e-6)
        if not torch.equal(packed, want_packed):
            raise AssertionError(_diagnose(name, packed, want_packed, levels))
    print(f"nf4_quantize_block matches bitsandbytes' NF4 on {len(blocks)} blocks (2 hand-made, 2 random)")

