"""The shared training loop: schedule, accumulation and determinism, checked against plain math."""

import math

import pytest
import torch
from torch import nn

from course_lib import train


def test_warmup_then_cosine():
    assert train.warmup_cosine(0, 100, warmup_steps=10) == pytest.approx(0.1)
    assert train.warmup_cosine(9, 100, warmup_steps=10) == pytest.approx(1.0)
    assert train.warmup_cosine(10, 100, warmup_steps=10) == pytest.approx(1.0)
    assert train.warmup_cosine(55, 100, warmup_steps=10) == pytest.approx(0.5)  # half-way through the decay
    assert train.warmup_cosine(100, 100, warmup_steps=10, min_ratio=0.1) == pytest.approx(0.1)


def test_batches_cover_each_epoch_once_and_reproduce():
    rows = list(range(10))
    stream = train.batches(rows, 5, seed=3)
    epoch = next(stream) + next(stream)
    assert sorted(epoch) == rows
    again = train.batches(rows, 5, seed=3)
    assert next(again) + next(again) == epoch
    with pytest.raises(ValueError, match="larger than"):
        next(train.batches(rows, 11))


def _mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def test_accumulation_equals_one_large_batch():
    """Two micro-batches of 4 with grad_accum=2 take the same SGD step as one batch of 8:
    the mean-squared error of 8 rows is the average of the two halves' means."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    big, small = nn.Linear(3, 1), nn.Linear(3, 1)
    small.load_state_dict(big.state_dict())
    for model, data, accum in [(big, [(x, y)], 1), (small, [(x[:4], y[:4]), (x[4:], y[4:])], 2)]:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        train.train(model, _mse, iter(data), steps=1, grad_accum=accum, optimizer=opt,
                    max_grad_norm=None, progress=False)
    torch.testing.assert_close(big.weight, small.weight)
    torch.testing.assert_close(big.bias, small.bias)


def test_training_reduces_loss_and_reproduces():
    def run():
        torch.manual_seed(1)
        x = torch.randn(64, 4)
        y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
        model = nn.Linear(4, 1)
        rows = list(zip(x, y))
        data = ((torch.stack([r[0] for r in b]), torch.stack([r[1] for r in b]))
                for b in train.batches(rows, 16, seed=0))
        return train.train(model, _mse, data, steps=60, lr=0.1, warmup_steps=5, progress=False)

    first, second = run(), run()
    assert first.loss == second.loss  # seeded and deterministic on CPU
    assert first.loss[-1] < first.loss[0] / 10
    assert first.lr[0] == pytest.approx(0.1 / 5) and first.lr[-1] < 0.01
    assert len(first.seconds) == 60 and not math.isnan(first.seconds_per_step)


def test_frozen_model_is_refused():
    model = nn.Linear(2, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train.train(model, _mse, iter([]), steps=1, progress=False)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_a_loss_that_does_its_own_backward_trains_like_the_plain_loss(grad_accum):
    """GradCache plugs into the loop with loss_fn_does_backward: the same parameters after three
    steps as the ordinary loss (with accumulation too: it must honour loss_scale)."""
    from course_lib import gradcache, retrieval

    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(6, generator=g), torch.randn(6, generator=g)) for _ in range(48)]

    def run(own_backward: bool):
        torch.manual_seed(0)
        model = nn.Linear(6, 4)

        def plain(m, rows):
            return retrieval.in_batch_negatives_loss(m(torch.stack([q for q, _ in rows])),
                                                     m(torch.stack([d for _, d in rows])))

        def cached(m, rows, scale):
            return gradcache.gradcache_step(m, torch.stack([q for q, _ in rows]), torch.stack([d for _, d in rows]),
                                            3, loss_scale=scale).loss

        history = train.train(model, cached if own_backward else plain, train.batches(pairs, 8, seed=0), steps=3,
                              lr=1e-2, grad_accum=grad_accum, progress=False, loss_fn_does_backward=own_backward)
        return model, history

    (a, ha), (b, hb) = run(False), run(True)
    assert ha.loss == pytest.approx(hb.loss, rel=1e-6)
    assert torch.allclose(a.weight, b.weight, atol=1e-6) and torch.allclose(a.bias, b.bias, atol=1e-6)
    torch.manual_seed(0)
    assert not torch.allclose(a.weight, nn.Linear(6, 4).weight, atol=1e-3)   # it did train
