"""Chapter 02's build-it exercise check: a correct NF4 block quantizer passes, shortcuts and mistakes do not."""

import logging

import pytest
import torch

from course_lib import linear4bit, quant
from course_lib.tooling.exercises import ShortcutError
from course_lib.tooling.exercises.nf4 import check_nf4_quantize_block

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
import bitsandbytes.functional as bnbF


def reference(block):
    """The chapter's solution: absmax, nearest level by argmin, first code in the high nibble."""
    absmax = block.abs().max()
    codes = (block.unsqueeze(1) / absmax - quant.nf4_codebook()).abs().argmin(dim=1).to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2], absmax.item()


def test_a_correct_solution_passes(capsys):
    check_nf4_quantize_block(reference)
    assert "matches bitsandbytes" in capsys.readouterr().out


def test_a_midpoint_solution_with_a_tensor_absmax_passes():
    levels = quant.nf4_codebook()

    def by_midpoints(block):
        absmax = block.abs().max()
        codes = torch.bucketize(block / absmax, (levels[1:] + levels[:-1]) / 2).to(torch.uint8)
        return (codes[0::2] << 4) | codes[1::2], absmax

    check_nf4_quantize_block(by_midpoints)


def test_calling_course_lib_is_a_shortcut():
    def via_course_lib(block):
        state = quant.quantize_blockwise(block, "nf4", 64)
        return state.packed, state.absmax.item()

    def via_linear4bit(block):
        layer = linear4bit.Linear4bit.from_linear(torch.nn.Linear(64, 1, bias=False), "nf4", 64, False)
        return layer.weight, layer.absmax.item()

    for shortcut in (via_course_lib, via_linear4bit):
        with pytest.raises(ShortcutError, match="write it yourself"):
            check_nf4_quantize_block(shortcut)


def test_calling_bitsandbytes_is_a_shortcut():
    def via_bitsandbytes(block):
        packed, state = bnbF.quantize_4bit(block, blocksize=64, quant_type="nf4")
        return packed.flatten(), state.absmax.item()

    def via_quantize_nf4(block):
        packed, state = bnbF.quantize_nf4(block, blocksize=64)
        return packed.flatten(), state.absmax.item()

    for shortcut in (via_bitsandbytes, via_quantize_nf4):
        with pytest.raises(ShortcutError, match="bitsandbytes"):
            check_nf4_quantize_block(shortcut)


def _not_a_shortcut(solution, match):
    with pytest.raises(AssertionError, match=match) as caught:
        check_nf4_quantize_block(solution)
    assert not isinstance(caught.value, ShortcutError)


def test_plausible_mistakes_fail_with_a_useful_message():
    levels = quant.nf4_codebook()

    def no_scaling(block):          # forgets to divide by absmax
        codes = (block.unsqueeze(1) - levels).abs().argmin(dim=1).to(torch.uint8)
        return (codes[0::2] << 4) | codes[1::2], block.abs().max().item()

    def low_nibble_first(block):    # packs the pair the other way round
        packed, absmax = reference(block)
        return (packed << 4) | (packed >> 4), absmax

    def signed_max(block):          # max instead of max |.|
        absmax = block.max()
        codes = (block.unsqueeze(1) / absmax - levels).abs().argmin(dim=1).to(torch.uint8)
        return (codes[0::2] << 4) | codes[1::2], absmax.item()

    def unpacked(block):            # one code per byte
        absmax = block.abs().max()
        return (block.unsqueeze(1) / absmax - levels).abs().argmin(dim=1).to(torch.uint8), absmax.item()

    _not_a_shortcut(no_scaling, "codes differ")
    _not_a_shortcut(low_nibble_first, "HIGH nibble")
    _not_a_shortcut(signed_max, "absmax")
    _not_a_shortcut(unpacked, r"shape \(32,\)")


def test_the_shortcuts_work_again_after_the_check():
    with pytest.raises(ShortcutError):
        check_nf4_quantize_block(lambda block: (quant.quantize_blockwise(block).packed, 1.0))
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    state = quant.quantize_blockwise(w, "nf4", 64)
    packed, bnb_state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(state.packed, packed.flatten())
    assert torch.equal(quant.dequantize_blockwise(state), bnbF.dequantize_4bit(packed, bnb_state))
    assert isinstance(linear4bit.Linear4bit.from_linear(torch.nn.Linear(64, 2), double_quant=False), linear4bit.Linear4bit)
    assert isinstance(linear4bit.Linear4bit.__dict__["from_linear"], classmethod)
