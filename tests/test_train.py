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


def test_bad_schedules_are_refused():
    model = nn.Linear(2, 1)
    for kwargs, message in [({"steps": 0}, "steps must be a positive integer"),
                            ({"grad_accum": 0}, "grad_accum .* at least 1"),
                            ({"grad_accum": -2}, "grad_accum .* at least 1"),
                            ({"steps": 3, "warmup_steps": 4}, "longer than the run"),
                            ({"warmup_steps": -1}, "cannot be negative")]:
        with pytest.raises(ValueError, match=message):
            train.train(model, _mse, iter([]), **{"steps": 5, **kwargs}, progress=False)
    # a warm-up as long as the run is allowed (chapter 01 trains 2 steps with 2 warm-up steps)
    x, y = torch.randn(4, 2), torch.randn(4, 1)
    history = train.train(model, _mse, iter([(x, y)] * 2), steps=2, warmup_steps=2, progress=False)
    assert history.lr == pytest.approx([1e-4 / 2, 1e-4])


def _token_rows(n=24, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (length,), generator=g) for _ in range(n)]


def _lm_loss(model, rows):
    ids = torch.stack(rows)
    return model(input_ids=ids, labels=ids).loss


def test_the_loop_is_a_plain_pytorch_loop():
    """On one CPU process the accelerate-based loop takes bit for bit the steps of a hand-written
    loop: AdamW, LambdaLR(warm-up + cosine), loss / grad_accum, backward, clip, step, zero_grad.
    (The chapters' committed outputs depend on this.)"""
    from course_lib import models

    rows, steps, accum, lr, warmup = _token_rows(), 5, 2, 1e-2, 2
    ours = models.tiny_llama()
    history = train.train(ours, _lm_loss, train.batches(rows, 4, seed=3), steps=steps, lr=lr, warmup_steps=warmup,
                          grad_accum=accum, max_grad_norm=0.5, seed=7, progress=False)

    torch.manual_seed(7)
    plain = models.tiny_llama()
    params = [p for p in plain.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)   # the loop's default
    multiplier = lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    stream, losses = train.batches(rows, 4, seed=3), []
    plain.train()
    for _ in range(steps):
        total = 0.0
        for _ in range(accum):
            loss = _lm_loss(plain, next(stream)) / accum
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(total)

    assert history.loss == losses
    for (name, a), b in zip(ours.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not ours.training


def test_gradient_checkpointing_trains_the_same_and_is_switched_off_after():
    from course_lib import models

    results = []
    for checkpointing in (False, True):
        model = models.tiny_llama()
        history = train.train(model, _lm_loss, train.batches(_token_rows(), 4, seed=0), steps=3, lr=1e-2,
                              progress=False, gradient_checkpointing=checkpointing)
        assert not model.is_activation_checkpointing
        results.append((history.loss, model.state_dict()))
    (loss_a, state_a), (loss_b, state_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert all(torch.allclose(state_a[k], state_b[k], atol=1e-6) for k in state_a)
    with pytest.raises(ValueError, match="transformers model"):
        train.train(nn.Linear(2, 1), _mse, iter([]), steps=1, progress=False, gradient_checkpointing=True)


@pytest.mark.parametrize("was_training", [False, True], ids=["eval-before", "train-before"])
@pytest.mark.parametrize("failure", ["loss raises", "loss is NaN", "eval raises"])
def test_a_failing_run_leaves_the_model_as_it_came_in(was_training, failure):
    """An error in the middle of the loop (the loss function raises, the loss is NaN, the
    evaluation raises) switches checkpointing back off and restores train/eval mode."""
    from course_lib import models

    model = models.tiny_llama().train(was_training)
    calls = []

    def loss(model, rows):
        calls.append(1)
        assert model.training and models.gradient_checkpointing_enabled(model)  # on during the run
        if len(calls) == 3 and failure == "loss raises":
            raise RuntimeError("out of memory (simulated)")
        value = _lm_loss(model, rows)
        return value * float("nan") if len(calls) == 3 and failure == "loss is NaN" else value

    def evaluate(model):
        raise RuntimeError("evaluation failed (simulated)")

    error = ValueError if failure == "loss is NaN" else RuntimeError
    with pytest.raises(error, match="at step 3" if failure == "loss is NaN" else "simulated"):
        train.train(model, loss, train.batches(_token_rows(), 4, seed=0), steps=4, progress=False,
                    gradient_checkpointing=True, eval_fn=evaluate if failure == "eval raises" else None,
                    eval_every=2)
    assert model.training is was_training
    assert not models.gradient_checkpointing_enabled(model)
    if failure == "loss is NaN":  # the NaN gradients of the refused step are not left behind
        assert all(p.grad is None for p in model.parameters())


def test_checkpointing_that_was_on_stays_on():
    from course_lib import models

    model = models.tiny_llama()
    models.set_gradient_checkpointing(model, True)
    train.train(model, _lm_loss, train.batches(_token_rows(), 4, seed=0), steps=1, progress=False,
                gradient_checkpointing=True)
    assert models.gradient_checkpointing_enabled(model) and not model.training


def test_shard_splits_a_global_batch_into_equal_contiguous_shares():
    rows = [{"i": i} for i in range(6)]
    assert train.shard(rows, 0, 1) is rows
    assert train.shard(rows, 0, 2) + train.shard(rows, 1, 2) == rows
    x, y = torch.arange(12).view(6, 2), torch.arange(6)
    first, second = train.shard((x, y), 0, 3), train.shard((x, y), 2, 3)
    assert torch.equal(first[0], x[:2]) and torch.equal(second[1], y[4:])
    batch = {"input_ids": x, "attention_mask": torch.ones(6, 2)}
    assert torch.equal(train.shard(batch, 1, 2)["input_ids"], x[3:])
    with pytest.raises(ValueError, match="cannot be split evenly"):
        train.shard(rows, 0, 4)
    with pytest.raises(TypeError, match="cannot split"):
        train.shard("text", 0, 2)


# Issue 21 (12): short data, a NaN step, a failure before the loop, and what ``seed`` covers.
def _pairs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 2, generator=g), torch.randn(4, 1, generator=g)) for _ in range(n)]


def test_data_shorter_than_the_run_is_refused_before_training():
    """A sized ``data`` (a list) with fewer micro-batches than steps x grad_accum is refused with
    the two counts, before any parameter moves (not a bare StopIteration mid-run)."""
    model = nn.Linear(2, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"3 micro-batches.* steps=2 x grad_accum=2 = 4"):
        train.train(model, _mse, _pairs(3), steps=2, grad_accum=2, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_stream_that_runs_out_says_how_many_batches_it_had():
    """An iterator cannot be counted in advance: when it runs dry the error gives the counts and the cure."""
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match=r"ran out after 3 micro-batches.* steps=2 x grad_accum=2 = 4.*batches\("):
        train.train(model, _mse, iter(_pairs(3)), steps=2, grad_accum=2, progress=False)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_a_nan_step_leaves_the_parameters_of_the_last_good_step(grad_accum):
    """The NaN check comes before optimizer.step: the weights equal those of a run that stopped
    one step earlier (no NaN written into them), and the message says what to do."""
    torch.manual_seed(0)
    model, calls, after = nn.Linear(2, 1), [], {}

    def loss(m, batch):
        calls.append(1)
        value = _mse(m, batch)
        return value * float("nan") if len(calls) == 2 * grad_accum + 1 else value   # step 3's first micro-batch

    def snapshot(m):
        after[len(after) + 1] = {k: v.clone() for k, v in m.state_dict().items()}
        return {}

    with pytest.raises(ValueError, match=r"at step 3.*not taken.*Lower lr"):
        train.train(model, loss, iter(_pairs(4 * grad_accum)), steps=4, grad_accum=grad_accum, lr=0.1,
                    eval_fn=snapshot, eval_every=1, progress=False)
    assert sorted(after) == [1, 2] and not torch.equal(after[1]["weight"], after[2]["weight"])
    for name, value in model.state_dict().items():
        assert torch.isfinite(value).all() and torch.equal(value, after[2][name]), name
    assert all(p.grad is None for p in model.parameters())


def test_data_that_is_not_iterable_leaves_checkpointing_off():
    """A failure before the first step (here: data that is not iterable) also switches
    gradient checkpointing back off and keeps the model's mode."""
    from course_lib import models

    model = models.tiny_llama()
    with pytest.raises(TypeError):
        train.train(model, _lm_loss, 42, steps=1, progress=False, gradient_checkpointing=True)
    assert not models.gradient_checkpointing_enabled(model) and not model.training


def test_seed_does_not_cover_adapter_initialisation_and_the_docstring_says_so():
    """Adapters are initialised when injected, before train() runs: the same ``seed`` after
    differently seeded injections trains different models; seed_everything before injecting fixes it."""
    from course_lib import lora, models

    def run(injection_seed):
        model = models.tiny_llama()   # (it seeds itself: the same base weights every time)
        train.seed_everything(injection_seed)
        model = lora.inject_lora(model, ["q_proj", "v_proj"], r=2)
        train.train(model, _lm_loss, train.batches(_token_rows(), 4, seed=0), steps=1, seed=0, progress=False)
        return torch.cat([p.detach().flatten() for p in train.trainable_parameters(model)])

    assert not torch.equal(run(1), run(2))
    assert torch.equal(run(1), run(1))
    doc = " ".join(train.train.__doc__.split())
    assert "not the adapters' initialisation" in doc and "seed_everything" in doc
