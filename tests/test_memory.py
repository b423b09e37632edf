"""Memory counts checked against what AdamW is documented to store."""

import pytest
import torch
from torch import nn

from course_lib import memory


def test_adamw_state_is_two_float32_moments_per_trainable_parameter():
    model = nn.Sequential(nn.Linear(10, 20), nn.Linear(20, 5))
    model[0].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    assert memory.optimizer_state_bytes(optimizer) == 0  # nothing before the first step
    model(torch.randn(3, 10)).sum().backward()
    optimizer.step()
    trainable = 20 * 5 + 5
    assert memory.optimizer_state_bytes(optimizer) == 2 * 4 * trainable
    assert memory.parameter_bytes(model, trainable_only=True) == 4 * trainable
    assert memory.parameter_bytes(model) == 4 * (10 * 20 + 20 + trainable)


def test_saved_activations_of_a_two_layer_mlp_by_hand():
    """What backward needs, from the derivatives: Linear 1 (input without grad) keeps its input x
    for dW1; ReLU keeps its output h; Linear 2 keeps h (the same storage) for dW2 and W2 for dh,
    and W2 is a parameter, not an activation. So the activations are x and h, nothing else."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    x = torch.randn(32, 64)
    with memory.SavedActivations(model) as saved:
        loss = model(x).sum()
        assert saved.current == 4 * 32 * 64 + 4 * 32 * 128
        loss.backward()
    assert saved.peak == 4 * 32 * 64 + 4 * 32 * 128
    assert saved.current == 0          # the graph is freed after backward, and so is the count
    del loss
    assert saved.current == 0


def test_saved_activations_grow_with_the_batch_and_are_freed_with_the_graph():
    model = nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 1))
    peaks = []
    for batch in (8, 16, 64):
        with memory.SavedActivations(model) as saved:
            out = model(torch.randn(batch, 32)).sum()
            during = saved.current
            del out                      # dropping the output frees the graph without a backward
        peaks.append(saved.peak)
        assert during == saved.peak > 0 and saved.current == 0
    assert peaks[1] == 2 * peaks[0] and peaks[2] == 8 * peaks[0]   # every saved tensor has the batch as a dimension


def test_measure_step_adds_up_parameters_gradients_state_and_activations():
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    model[0].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    x = torch.randn(32, 64)

    def step():
        model(x).sum().backward()
        optimizer.step()

    m = memory.measure_step(step, model, optimizer)
    trainable = 128 * 10 + 10
    assert m["parameters"] == 4 * (64 * 128 + 128 + trainable)
    assert m["gradients"] == 4 * trainable
    assert m["optimizer_state"] == 8 * trainable
    assert m["activations_peak"] == 4 * 32 * 128          # the frozen first layer needs no input: only h
    assert m["total"] == m["parameters"] + m["gradients"] + m["optimizer_state"] + m["activations_peak"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_accounting_agrees_with_the_cuda_allocator():
    """On a GPU the allocator's growth during a step is what the step adds: the saved activations,
    then, in backward, exactly two activation-sized gradients at a time (the one flowing into a layer
    and the one it passes on) and one weight gradient being added into ``.grad``. Counted from the
    allocator's level at the start of the step, so what else is allocated (parameters, optimizer
    state and ``.grad``, held from the first step; the input; cuBLAS's workspace; tensors of other
    tests) cancels out. Measured on an H200 (2026-12-04): 292.0 MiB, this sum exactly."""
    model = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(1024, 1024), nn.GELU())]).cuda()
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(4096, 1024, device="cuda")

    def step():
        model(x).sum().backward()
        optimizer.step()

    step()                       # optimizer state and .grad exist from here on
    m = memory.measure_step(step, model, optimizer)
    activation, weight_gradient = x.numel() * 4, 1024 * 1024 * 4
    assert m["activations_peak"] == 16 * activation      # each Linear's and each GELU's input
    assert m["cuda_allocated_at_start"] >= m["parameters"] + m["gradients"] + m["optimizer_state"]
    growth = m["cuda_max_allocated"] - m["cuda_allocated_at_start"]
    assert growth == pytest.approx(m["activations_peak"] + 2 * activation + weight_gradient, rel=0.02)


def test_quantized_weight_bytes_counts_the_4bit_layers_buffers_only():
    from course_lib import linear4bit, models

    model = models.tiny_llama(0)
    assert any(True for _ in model.buffers())  # rotary frequencies: buffers that are not weights
    assert memory.quantized_weight_bytes(model) == 0
    linear4bit.quantize_model(model, "nf4", double_quant=True)
    layers = [m for m in model.modules() if isinstance(m, linear4bit.Linear4bit)]
    expected = sum(b.numel() * b.element_size() for m in layers for b in m.buffers())
    assert layers and memory.quantized_weight_bytes(model) == expected
    # a 4-bit weight costs about half a byte per element (plus its absmax constants)
    elements = sum(m.in_features * m.out_features for m in layers)
    assert 0.5 <= expected / elements < 0.6
