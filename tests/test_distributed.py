"""course_lib.distributed: two CPU processes (gloo) against one process on the same global batch.

Every multi-process test goes through `distributed.launch` with a timeout, so a hang fails. The
functions the processes run are at the top of this module (each rank imports them by name). The
references are computed without any process group: the full batch in one process with
`retrieval.in_batch_negatives_loss` / plain AdamW, and sentence-transformers'
``MultipleNegativesRankingLoss(gather_across_devices=True)`` for the gathered loss.
"""

import atexit
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from course_lib import data, distributed, lora, models, processes, retrieval

MAX_TOKENS = 32        # tokens per text in the contrastive tests
PAIRS = 16             # the global contrastive batch: 8 pairs per process
SEQ, ROWS, STEPS = 16, 8, 3


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def torch_all_gather(t):
    """torch's own differentiable all-gather (deprecated in torch 2.13, hence the filter)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(torch.distributed.nn.functional.all_gather(t), dim=0)


# ---------------------------------------------------------------------------------------------
# The contrastive loss across processes, on MiniLM's tokenizer and architecture
# ---------------------------------------------------------------------------------------------
def contrastive_worker(rank, world):
    """Runs in each process: the full-batch reference gradient (no communication), then this rank's
    share with GradCache, sentence-transformers' loss, and the gathered and local losses under DDP.

    The encoder is `models.tiny_bert` at MiniLM's vocabulary (2 layers, hidden size 32, random
    weights): what is checked is arithmetic across processes, which does not depend on the weights
    (tests/test_gradcache.py checks the same step against sentence-transformers on the real MiniLM)."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss as ST_MNRL
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(models.minilm_path()))
    model = models.tiny_bert(vocab_size=tokenizer.vocab_size, max_position_embeddings=MAX_TOKENS)
    # eval mode (tiny_bert's): no dropout, so the masks cannot differ between the passes
    model.pooler = None                                 # unused by mean pooling (DDP wants every parameter used)

    def encode(texts, module=model):
        batch = tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        return retrieval.mean_pool(module(**batch).last_hidden_state, batch["attention_mask"])

    rows = data.load_code_search("train")[:PAIRS]
    queries, docs = [r["query"] for r in rows], [r["document"] for r in rows]
    out = {}

    full_loss = retrieval.in_batch_negatives_loss(encode(queries), encode(docs))
    full_loss.backward()
    reference = flat_grad(model)
    model.zero_grad(set_to_none=True)
    out["full_loss"] = full_loss.item()
    my_q, my_d = distributed.local_rows(queries), distributed.local_rows(docs)

    result = distributed.gradcache_step_across_processes(encode, my_q, my_d, chunk_size=3)   # 3 does not divide 8
    distributed.average_gradients(model)
    out["gap_gradcache"] = relative_gap(flat_grad(model), reference)
    out["loss_gradcache"] = distributed.mean_over_processes(result.loss)
    model.zero_grad(set_to_none=True)

    # sentence-transformers on the same local embeddings: same loss, same gradient on the embeddings
    for symmetric, kwargs in ((False, {}), (True, {"directions": ("query_to_doc", "doc_to_query"),
                                                  "partition_mode": "per_direction"})):
        with torch.no_grad():
            q0, d0 = encode(my_q), encode(my_d)
        q, d = q0.clone().requires_grad_(), d0.clone().requires_grad_()
        ours = distributed.contrastive_loss_across_processes(q, d, symmetric=symmetric)
        ours_grad = torch.autograd.grad(ours, [q, d])
        q, d = q0.clone().requires_grad_(), d0.clone().requires_grad_()
        theirs = ST_MNRL(None, scale=20.0, gather_across_devices=True, **kwargs).compute_loss_from_embeddings(
            [q, d], None)
        theirs_grad = torch.autograd.grad(theirs, [q, d])
        out[f"st_loss_gap_{symmetric}"] = abs(ours.item() - theirs.item())
        out[f"st_grad_gap_{symmetric}"] = max(relative_gap(a, b) for a, b in zip(ours_grad, theirs_grad))

    # our all-gather against torch's differentiable one: the same values and the same gradients
    t = torch.randn(3, 5, generator=torch.Generator().manual_seed(rank))
    weights = torch.randn(3 * world, 5, generator=torch.Generator().manual_seed(10 + rank))
    grads = []
    for gather in (distributed.gather_with_grad, torch_all_gather):
        x = t.clone().requires_grad_()
        gathered = gather(x)
        (gathered * weights).sum().backward()
        grads.append((gathered.detach(), x.grad))
    out["gather_equal"] = all(torch.equal(a, b) for a, b in zip(*grads))
    out["gather_grad"] = grads[0][1]

    ddp = torch.nn.parallel.DistributedDataParallel(model)   # last: its hooks stay on the parameters
    for gather in (True, False):
        loss = distributed.contrastive_loss_across_processes(encode(my_q, ddp), encode(my_d, ddp), gather=gather)
        loss.backward()                                  # DDP averages the gradients over the two ranks
        out[f"gap_gather_{gather}"] = relative_gap(flat_grad(model), reference)
        out[f"loss_gather_{gather}"] = distributed.mean_over_processes(loss)
        model.zero_grad(set_to_none=True)
    return out


@pytest.fixture(scope="module")
def contrastive():
    start = time.monotonic()
    results = distributed.launch(contrastive_worker, 2, timeout=240)
    print(f"contrastive worker: {time.monotonic() - start:.1f} s", results[0])
    return results


def test_gathered_loss_gives_the_full_batch_gradient(contrastive):
    """DDP-averaged gradients of the gathered loss, 2 × 8 pairs, equal one process's 16-pair
    gradient (measured ~1e-7: float32 sums in another order); the loss is the full batch's."""
    for rank in contrastive:
        assert rank["gap_gather_True"] < 1e-5
        assert rank["loss_gather_True"] == pytest.approx(rank["full_loss"], rel=1e-5)


def test_local_negatives_only_give_another_gradient(contrastive):
    """Without gathering each query sees 7 negatives instead of 15: a different loss (lower: fewer
    candidates to beat) and a gradient far outside the tolerance above (measured ~0.3)."""
    for rank in contrastive:
        assert rank["gap_gather_False"] > 1e-2
        assert rank["loss_gather_False"] < rank["full_loss"] - 0.05


def test_gradcache_across_processes_equals_one_large_batch(contrastive):
    """2 processes × GradCache chunks of 3 (not dividing the 8 local pairs) = the 16-pair gradient."""
    for rank in contrastive:
        assert rank["gap_gradcache"] < 1e-5
        assert rank["loss_gradcache"] == pytest.approx(rank["full_loss"], rel=1e-5)


def test_gathered_loss_matches_sentence_transformers(contrastive):
    """MultipleNegativesRankingLoss(gather_across_devices=True), plain and symmetric (per
    direction): the same per-rank loss and embedding gradients, on each rank."""
    for rank in contrastive:
        for symmetric in (False, True):
            assert rank[f"st_loss_gap_{symmetric}"] < 1e-5
            assert rank[f"st_grad_gap_{symmetric}"] < 1e-5


def test_gather_with_grad_equals_torchs_differentiable_all_gather(contrastive):
    """Values and gradients equal torch.distributed.nn.functional.all_gather's, bit for bit; and
    by hand: each rank's loss is sum(gathered * W_rank), so the gradient of its own 3 rows is
    the sum over ranks of those rows of W (seeds 10 and 11), the same on both ranks' slices."""
    w = [torch.randn(6, 5, generator=torch.Generator().manual_seed(10 + r)) for r in (0, 1)]
    for rank, result in enumerate(contrastive):
        assert result["gather_equal"]
        assert torch.allclose(result["gather_grad"], (w[0] + w[1])[3 * rank:3 * rank + 3], atol=1e-6)


def test_one_process_is_the_ordinary_loss():
    """World size 1 (no process group) is a documented fallback, not an error: nothing to gather."""
    torch.manual_seed(0)
    q, d = torch.randn(6, 8), torch.randn(6, 8)
    assert distributed.gather_with_grad(q) is q
    expected = retrieval.in_batch_negatives_loss(q, d, scale=20.0)
    assert torch.equal(distributed.contrastive_loss_across_processes(q, d), expected)
    assert distributed.mean_over_processes(expected) == pytest.approx(expected.item())


# ---------------------------------------------------------------------------------------------
# Sharded training: ZeRO-0/1 (DDP, ZeroRedundancyOptimizer) and FSDP2, full fine-tune and LoRA
# ---------------------------------------------------------------------------------------------
def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def token_batch() -> torch.Tensor:
    return torch.randint(0, 128, (ROWS, SEQ), generator=torch.Generator().manual_seed(1))


def tiny_model(use_lora: bool):
    model = models.tiny_llama(0).train()
    return lora.inject_lora(model, "all-linear", r=4, lora_alpha=8) if use_lora else model


def train(model, ids, strategy=None):
    """STEPS AdamW steps with clipping; ``strategy=None`` is the single-process reference."""
    if strategy is not None:
        model = distributed.shard(model, strategy)
        ids = distributed.local_rows(ids)
    optimizer = distributed.make_optimizer(model, lr=1e-2)
    losses = [distributed.train_step(model, optimizer, lm_loss, ids, max_grad_norm=1.0) for _ in range(STEPS)]
    return model, optimizer, losses


def sharded_worker(rank, world):
    out = {}
    for use_lora in (False, True):
        for strategy in distributed.STRATEGIES:
            model, optimizer, losses = train(tiny_model(use_lora), token_batch(), strategy)
            at_rest = distributed.state_bytes(model, optimizer)
            loss = lm_loss(model, distributed.local_rows(token_batch()))
            after_forward = distributed.state_bytes(model)["parameters"]
            loss.backward()
            optimizer.zero_grad(set_to_none=True)
            out[strategy, use_lora] = {"losses": losses, "bytes": at_rest, "after_forward": after_forward,
                                       "params": distributed.full_parameters(model)}
    return out


@pytest.fixture(scope="module")
def sharded():
    start = time.monotonic()
    results = distributed.launch(sharded_worker, 2, timeout=240)
    print(f"sharded worker: {time.monotonic() - start:.1f} s")
    single = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # the processes' kernels (each of the 2 got one of the 2 cores)
    try:
        for use_lora in (False, True):
            model, optimizer, losses = train(tiny_model(use_lora), token_batch())
            half, _, _ = train(tiny_model(use_lora), token_batch()[: ROWS // 2])
            single[use_lora] = {"losses": losses, "bytes": distributed.state_bytes(model, optimizer),
                                "params": dict(model.named_parameters()), "half": dict(half.named_parameters()),
                                "initial": dict(tiny_model(use_lora).named_parameters())}
    finally:
        torch.set_num_threads(threads)
    return results, single


def max_gap(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].detach() - b[k].detach()).abs().max().item() for k in a)


# AdamW's first steps move every weight by ~lr · sign(g), so float32 differences in a gradient
# entry near zero (the two ranks' means averaged vs one mean over all rows: another summation order,
# ~1e-7 relative) reach the weights amplified: measured 2.4e-5 for the full fine-tune, 2e-7 for LoRA.
# Training on one rank's half of the batch instead ends ~1e-2 away (asserted: > 100 × the tolerance).
PARAM_TOLERANCE = 1e-4


@pytest.mark.parametrize("use_lora", [False, True], ids=["full-finetune", "lora"])
@pytest.mark.parametrize("strategy", list(distributed.STRATEGIES))
def test_two_processes_train_like_one(sharded, strategy, use_lora):
    results, single = sharded
    reference = single[use_lora]
    for rank in results:
        run = rank[strategy, use_lora]
        assert run["losses"] == pytest.approx(reference["losses"], rel=1e-5)
        gap = max_gap(run["params"], reference["params"])
        print(f"{strategy} lora={use_lora}: largest weight gap {gap:.1e}")
        assert gap < PARAM_TOLERANCE
    assert max_gap(reference["params"], reference["initial"]) > 1e-2          # it trained
    half_gap = max_gap(reference["half"], reference["params"])
    print(f"lora={use_lora}: one rank's half alone ends {half_gap:.1e} away")
    assert half_gap > 100 * PARAM_TOLERANCE                                   # the test can tell


@pytest.mark.parametrize("use_lora", [False, True], ids=["full-finetune", "lora"])
def test_fsdp_holds_half_of_everything_per_rank(sharded, use_lora):
    """ZeRO-3 and ZeRO-2: each rank stores half of the parameters, gradients and AdamW state
    (tiny_llama's dimensions are even; AdamW's step counters are the only replicated bytes)."""
    results, single = sharded
    whole = single[use_lora]["bytes"]
    for rank in results:
        for strategy in ("full", "grad_op"):
            for kind, size in rank[strategy, use_lora]["bytes"].items():
                print(f"{strategy} lora={use_lora} {kind}: {size / whole[kind]:.3f} of one process")
                assert size / whole[kind] <= 0.55, (strategy, kind)


@pytest.mark.parametrize("use_lora", [False, True], ids=["full-finetune", "lora"])
def test_zero1_shards_only_the_optimizer_state(sharded, use_lora):
    results, single = sharded
    whole = single[use_lora]["bytes"]
    assert results[0]["ddp", use_lora]["bytes"] == whole          # ZeRO-0: everything replicated
    states = [rank["optimizer", use_lora]["bytes"] for rank in results]
    assert all(s["parameters"] == whole["parameters"] and s["gradients"] == whole["gradients"] for s in states)
    assert sum(s["optimizer"] for s in states) == whole["optimizer"]   # a partition: each state on one rank
    assert max(s["optimizer"] for s in states) / whole["optimizer"] <= 0.55


def test_grad_op_keeps_parameters_gathered_from_forward_to_backward(sharded):
    """The difference between ZeRO-3 and ZeRO-2: between forward and backward, ``"full"`` has
    re-sharded every layer, ``"grad_op"`` still holds all the parameters whole."""
    results, single = sharded
    for rank in results:
        assert rank["full", False]["after_forward"] == rank["full", False]["bytes"]["parameters"]
        assert rank["grad_op", False]["after_forward"] == single[False]["bytes"]["parameters"]


# ---------------------------------------------------------------------------------------------
# Bad input and failures: clear errors, never a hang
# ---------------------------------------------------------------------------------------------
def test_a_batch_must_split_evenly():
    assert distributed.local_rows(list(range(8)), rank=1, world_size=2) == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="cannot feed 4 processes.*at most 3 processes"):
        distributed.local_rows([1, 2, 3], rank=0, world_size=4)
    with pytest.raises(ValueError, match="does not split evenly.*batch of 8 or 12 rows"):
        distributed.local_rows(list(range(10)), rank=0, world_size=4)


def uneven_worker(rank, world):
    torch.manual_seed(rank)
    n = 3 + rank                                     # rank 0 holds 3 pairs, rank 1 holds 4
    return distributed.contrastive_loss_across_processes(torch.randn(n, 8), torch.randn(n, 8))


def test_uneven_shards_fail_in_the_gathered_loss():
    with pytest.raises(ValueError, match=r"rank \d of 2 raised ValueError.*same shape.*\(3, 8\), \(4, 8\)"):
        distributed.launch(uneven_worker, 2, timeout=120)


def failing_worker(rank, world):
    if rank == 1:
        raise KeyError("no such column")
    torch.distributed.barrier()                      # rank 0 would wait here for ever


def test_an_exception_in_a_child_comes_back_with_its_rank(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))   # where torch puts a rank's traceback file
    start = time.monotonic()
    with pytest.raises(KeyError, match="rank 1 of 2 raised KeyError.*no such column"):
        distributed.launch(failing_worker, 2, timeout=120)
    assert time.monotonic() - start < 60               # rank 0 was stopped, not waited for
    assert not list(tmp_path.glob("pytorch-errorfile-*"))   # launch removed the one rank 1 wrote


def aborting_at_exit_worker(rank, world):
    """Returns its result, and has a clean-up that aborts the process at interpreter shutdown, as a
    library's C++ destructor did once in CI (SIGABRT after a successful FSDP2 run)."""
    atexit.register(os.kill, os.getpid(), signal.SIGABRT)
    return {"rank": rank, "value": torch.full((2,), float(rank))}


def test_a_crash_in_clean_up_at_exit_cannot_fail_a_finished_rank():
    """A rank leaves as soon as its result is saved and its process group destroyed (os._exit),
    so the interpreter's shutdown, where the abort is registered, never runs."""
    results = distributed.launch(aborting_at_exit_worker, 2, timeout=120)
    assert [r["rank"] for r in results] == [0, 1]
    assert torch.equal(results[1]["value"], torch.ones(2))


def test_the_rank_that_failed_first_is_reported_not_the_one_noticed_first(tmp_path):
    """Rank 1 raised; rank 0's barrier then failed because rank 1 was gone. On a loaded machine both
    had ended when launch looked, and torch named rank 0 (a CI run reported its "Connection closed
    by peer" instead of rank 1's KeyError). launch reports the earliest saved failure."""
    def record(kind, message, at):
        return {"error_type": kind, "message": message, "traceback": "...", "failed_at": at}
    torch.save(record("builtins:RuntimeError", "Connection closed by peer", 12.5), tmp_path / "rank0")
    torch.save(record("builtins:KeyError", "no such column", 12.0), tmp_path / "rank1")
    assert processes._first_failure(tmp_path, 2, noticed=0) == 1
    error = processes._child_error(tmp_path, processes._first_failure(tmp_path, 2, noticed=0), 2, RuntimeError("exit 1"))
    assert isinstance(error, KeyError) and "rank 1 of 2 raised KeyError" in str(error)
    torch.save(record("builtins:KeyError", "no such column", 13.0), tmp_path / "rank1")   # now rank 0 was first
    assert processes._first_failure(tmp_path, 2, noticed=1) == 0
    (tmp_path / "rank0").unlink(), (tmp_path / "rank1").unlink()     # no rank saved an exception
    assert processes._first_failure(tmp_path, 2, noticed=1) == 1


def test_a_rank_that_died_after_saving_its_result_is_named(tmp_path):
    torch.save({"result": 3}, tmp_path / "rank1")
    error = processes._child_error(tmp_path, 1, 2, RuntimeError("process 1 terminated with signal SIGABRT"))
    assert isinstance(error, RuntimeError)
    assert "rank 1 of 2 returned its result, then its process died while exiting" in str(error)
    assert "SIGABRT" in str(error)


class Opaque:
    pass


def opaque_worker(rank, world):
    return Opaque()


def test_a_result_that_cannot_come_back_safely_is_refused_with_what_to_return():
    with pytest.raises(TypeError, match=r"rank 0 returned something launch cannot bring back safely \(a test_distributed\.Opaque\): return tensors"):
        distributed.launch(opaque_worker, 2, timeout=120)


def hanging_worker(rank, world):
    if rank == 1:
        time.sleep(600)
    torch.distributed.barrier()                      # rank 0 waits here for rank 1, which never comes


def test_a_hang_is_a_timeout_and_the_processes_are_killed():
    start = time.monotonic()
    # 5 s: the ranks need not even have started by then, a kill is a kill; a longer timeout only
    # keeps a test worker waiting
    with pytest.raises(TimeoutError, match="did not finish within 5 s and were killed"):
        distributed.launch(hanging_worker, 2, timeout=5)
    assert time.monotonic() - start < 35
    assert not multiprocessing.active_children()      # no process left behind


def environment_worker(rank, world, names):
    return {"parent": os.getppid(), "values": [os.environ.get(name, "<unset>") for name in names]}


def test_ranks_see_the_environment_of_the_call_not_of_the_first_launch(monkeypatch):
    """Ranks are forks of one server process started by the first launch, with the environment of
    that moment; a later launch still hands its ranks the caller's environment as it is then, as
    spawn does (a variable set since, one removed since), and the rank variables launch adds."""
    monkeypatch.setenv("COURSE_LAUNCH_REMOVED", "present at the first launch")
    first = distributed.launch(environment_worker, 2, ["COURSE_LAUNCH_REMOVED"], timeout=120)
    assert [r["values"] for r in first] == [["present at the first launch"]] * 2
    monkeypatch.delenv("COURSE_LAUNCH_REMOVED")
    monkeypatch.setenv("COURSE_LAUNCH_ADDED", "set after the first launch")
    names = ["COURSE_LAUNCH_ADDED", "COURSE_LAUNCH_REMOVED", "RANK", "WORLD_SIZE"]
    later = distributed.launch(environment_worker, 2, names, timeout=120)
    assert [r["values"] for r in later] == [["set after the first launch", "<unset>", str(rank), "2"] for rank in (0, 1)]
    if processes._START_METHOD == "forkserver":
        # one server, reused: every rank of both launches is its child, and none is this process's
        assert len({r["parent"] for r in first + later}) == 1
        assert first[0]["parent"] != os.getpid()


def test_a_rank_reads_the_callers_module_as_it_is_now(tmp_path, monkeypatch):
    """The fork server preloads course_lib's modules, never the module the worker comes from: each
    rank imports that one itself, as a spawned process would, so a file edited since the first launch
    is read again (a preloaded copy would run the old code). The assertions on `_preload` guard that
    choice: Python 3.11's fork server ignores the caller's sys.path (CPython gh-117378, fixed in 3.12
    and later), so there a preloaded file outside the installed packages fails to import and the
    launches below would pass either way."""
    assert processes._preload(environment_worker) == ["course_lib.distributed"]
    assert processes._preload(distributed.local_rows) == ["course_lib.distributed"]
    from course_lib.tooling import fsdp_demo
    assert processes._preload(fsdp_demo.train_smollm2) == ["course_lib.distributed", "course_lib.tooling.fsdp_demo"]
    module = tmp_path / "course_launch_edited.py"
    module.write_text("def worker(rank, world):\n    return 'first version'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import course_launch_edited
    assert distributed.launch(course_launch_edited.worker, 2, timeout=120) == ["first version"] * 2
    module.write_text("def worker(rank, world):\n    return 'the file as edited since'\n")
    assert distributed.launch(course_launch_edited.worker, 2, timeout=120) == ["the file as edited since"] * 2


def test_a_port_in_use_is_refused():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ValueError, match=f"port {port} on 127.0.0.1 is in use.*port=None"):
            distributed.launch(uneven_worker, 2, port=port, timeout=30)


TORCHRUN_SCRIPT = """
import json, sys, torch
from course_lib import distributed
rank, world = distributed.init_from_env()
torch.manual_seed(0)
q, d = torch.randn(8, 16), torch.randn(8, 16)          # the same global batch on every rank
loss = distributed.contrastive_loss_across_processes(distributed.local_rows(q), distributed.local_rows(d))
mean = distributed.mean_over_processes(loss)
if rank == 0:
    json.dump({"world": world, "backend": torch.distributed.get_backend(), "loss": mean}, open(sys.argv[1], "w"))
torch.distributed.destroy_process_group()
"""


def test_the_same_code_runs_under_torchrun(tmp_path):
    """``init_from_env`` joins the group that torchrun sets up: the gathered loss over 2 × 4 rows
    is the 8-row loss computed here in one process."""
    script, out = tmp_path / "script.py", tmp_path / "out.json"
    script.write_text(TORCHRUN_SCRIPT)
    # TMPDIR: torchrun keeps its log folders (torchelastic_*) in the temp folder after it ends
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TMPDIR": str(tmp_path)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(distributed.free_port()), str(script), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    torch.manual_seed(0)
    expected = retrieval.in_batch_negatives_loss(torch.randn(8, 16), torch.randn(8, 16)).item()
    assert result["world"] == 2 and result["backend"] == "gloo"
    assert result["loss"] == pytest.approx(expected, rel=1e-6)


def test_sharding_needs_a_process_group():
    with pytest.raises(RuntimeError, match="needs a process group"):
        distributed.shard(models.tiny_llama(0), "full")
    with pytest.raises(ValueError, match="strategy must be one of"):
        distributed.shard(models.tiny_llama(0), "zero3")


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct, LoRA, fully sharded over two processes
# ---------------------------------------------------------------------------------------------
def smollm2_rows(tokenizer, rows: int = 4, length: int = 32) -> torch.Tensor:
    """Equal-length rows of real text (code-search documents): no padding, so every token weighs
    the same in each rank's mean and the mean of the two ranks' losses is the full batch's."""
    text = "\n".join(r["document"] for r in data.load_code_search("train")[:40])
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    return ids[: rows * length].reshape(rows, length)


def smollm2_worker(rank, world):
    model, tokenizer = models.load_smollm2("cpu")
    lora.inject_lora(model, ["q_proj", "v_proj"], r=8, lora_alpha=16)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    whole = {"parameters": distributed.state_bytes(model)["parameters"], "gradients": trainable,
             "optimizer": 2 * trainable}                 # AdamW: exp_avg and exp_avg_sq per trainable value
    model = distributed.shard(model.train(), "full")
    optimizer = distributed.make_optimizer(model, lr=1e-3)
    loss = distributed.train_step(model, optimizer, lm_loss, distributed.local_rows(smollm2_rows(tokenizer)))
    return {"loss": loss, "whole": whole, "local": distributed.state_bytes(model, optimizer)}


def test_smollm2_lora_fully_sharded(smollm2):
    """Two processes, each holding half of SmolLM2 (ZeRO-3): the first step's loss is the unsharded
    model's on the whole batch (LoRA's B starts at zero), and each rank stores about half of the
    parameters, LoRA gradients and AdamW state."""
    start = time.monotonic()
    results = distributed.launch(smollm2_worker, 2, timeout=240)
    print(f"SmolLM2 over 2 processes: {time.monotonic() - start:.1f} s")
    model, tokenizer = smollm2
    ids = smollm2_rows(tokenizer)
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss.item()
    for rank in results:
        print(f"SmolLM2 first loss, 2 processes vs one: {rank['loss']:.7f} vs {expected:.7f}")
        assert rank["loss"] == pytest.approx(expected, rel=1e-5)
        for kind, size in rank["local"].items():
            print(f"SmolLM2 {kind}: {size / rank['whole'][kind]:.3f} of one process")
            assert size / rank["whole"][kind] <= 0.55


# ---------------------------------------------------------------------------------------------
# FSDP2 over bitsandbytes' 4-bit weights (FSDP-QLoRA), on the CPU
# ---------------------------------------------------------------------------------------------
QDIM, QRANK, QCLASSES, QROWS, QSTEPS = 64, 4, 4, 16, 2


def qlora_model() -> torch.nn.Module:
    """Three blocks of a frozen NF4 ``Linear4bit`` (64 × 64, float32 compute) plus a trainable
    LoRA pair (B starts at zero), GELU between blocks, a trainable float32 head; seeded, so every
    process builds and quantizes the same model. The packed 4-bit weight is stored as float32, the
    dtype of the trainable parameters, as bitsandbytes' FSDP-QLoRA guide asks (``quant_storage``
    matching the model's dtype). ``Linear4bit`` gives its weight ``Params4bit(..., module=self)``, so
    quantizing also sets ``layer.quant_state``: FSDP2's gathered weight is a plain tensor that has
    lost ``weight.quant_state``, and the layer's forward takes it back from there."""
    import logging

    quiet = logging.getLogger("bitsandbytes")
    level = quiet.level
    quiet.setLevel(logging.ERROR)     # on AVX-512-BF16 CPUs the import warns that an optional eval-mode kernel
    try:                              # ("kernels-community" gemm_4bit_forward) is missing: unused here
        import bitsandbytes as bnb
    finally:
        quiet.setLevel(level)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = bnb.nn.Linear4bit(QDIM, QDIM, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                                          quant_storage=torch.float32)
            self.lora_a = torch.nn.Linear(QDIM, QRANK, bias=False)
            self.lora_b = torch.nn.Linear(QRANK, QDIM, bias=False)
            torch.nn.init.zeros_(self.lora_b.weight)

        def forward(self, x):
            return self.base(x) + self.lora_b(self.lora_a(x))

    torch.manual_seed(0)
    model = torch.nn.Sequential(Block(), torch.nn.GELU(), Block(), torch.nn.GELU(), Block(), torch.nn.GELU(),
                                torch.nn.Linear(QDIM, QCLASSES))
    model.to("cpu")                   # Params4bit quantizes on its first move to a device
    models.use_one_cpu_path(model)    # never repack the weights for the eval-mode bfloat16 kernel
    return model.train()


def qlora_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(QROWS, QDIM, generator=g), torch.randint(0, QCLASSES, (QROWS,), generator=g)


def qlora_loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def four_bit_layers(model):
    import bitsandbytes as bnb  # already imported, quietly, by qlora_model

    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}   # FSDPLinear4bit too


def qlora_worker(rank, world):
    model = qlora_model()               # first: it imports bitsandbytes without the import-time warning
    import bitsandbytes.functional as bnbF

    blocks = [model[i] for i in (0, 2, 4)]
    model = distributed.shard(model, "full", layers=[b.base for b in blocks] + blocks)
    local = {name: layer.weight.to_local() for name, layer in four_bit_layers(model).items()}
    optimizer = distributed.make_optimizer(model, lr=1e-2)
    batch = tuple(distributed.local_rows(t) for t in qlora_batch())
    losses = [distributed.train_step(model, optimizer, qlora_loss, batch) for _ in range(QSTEPS)]
    gathered = {}
    for name, layer in four_bit_layers(model).items():
        packed = layer.weight.full_tensor()           # a collective: every rank gathers every layer
        gathered[name] = {"bytes": packed.view(torch.uint8).clone(), "dtype": packed.dtype,
                          "dequantized": bnbF.dequantize_4bit(packed, layer.quant_state)}
    trained = {k: v for k, v in distributed.full_parameters(model).items() if "base" not in k}
    return {"losses": losses, "local_bytes": {k: v.numel() * v.element_size() for k, v in local.items()},
            "parameters": distributed.state_bytes(model)["parameters"], "gathered": gathered, "trained": trained}


def test_fsdp2_shards_bitsandbytes_4bit_weights():
    """FSDP2 (ZeRO-3, each Linear4bit, each block, then the root) over 3 frozen NF4 layers + LoRA,
    2 processes × 8 rows against one process on the 16 rows, 2 AdamW steps:
    (a) each rank stores half of every packed weight: 64 × 64 4-bit values are 2048 bytes (512
        float32 holding 8 values each), 1024 per rank; the model's parameter bytes exactly halve
        (every dimension is even). The quantization state (absmax, code) is a plain attribute, not
        a parameter: each rank keeps it whole, and state_bytes does not count it;
    (b) the losses are the one-process losses (the mean of two 8-row means is the 16-row mean);
    (c) the LoRA and head weights end within PARAM_TOLERANCE of the one-process run (measured
        1.3e-5, in the last block's A, whose gradient is zero at step 1 since B starts at zero, so
        AdamW's step 2 normalizes a tiny float32 gradient), and every one of them moved > 10 ×
        the tolerance (measured >= 7.5e-3): gradients flowed back through the 4-bit layers;
    (d) the packed weight gathered back (full_tensor) is, byte for byte, the one this process
        quantizes from the same seed, and dequantizes (dequantize_4bit with the layer's
        quant_state) bit for bit to the same float32 weight. Bytes, not floats, are compared: float32
        storage of packed nibbles holds NaN bit patterns (7 of these 1536 words), which FSDP's
        all-gather copies untouched but torch.equal on floats would call unequal."""
    start = time.monotonic()
    results = distributed.launch(qlora_worker, 2, timeout=120)
    print(f"FSDP2 over 4-bit layers, 2 processes: {time.monotonic() - start:.1f} s")
    model = qlora_model()
    import bitsandbytes.functional as bnbF

    quantized = {name: (layer.weight.data.clone(), layer.quant_state) for name, layer in four_bit_layers(model).items()}
    whole_parameters = distributed.state_bytes(model)["parameters"]
    initial = {k: v.detach().clone() for k, v in model.named_parameters() if "base" not in k}
    optimizer = distributed.make_optimizer(model, lr=1e-2)
    losses = [distributed.train_step(model, optimizer, qlora_loss, qlora_batch()) for _ in range(QSTEPS)]
    reference = {k: v.detach() for k, v in model.named_parameters() if "base" not in k}
    assert len(quantized) == 3
    for rank in results:
        assert rank["local_bytes"] == dict.fromkeys(quantized, QDIM * QDIM // 2 // 2)              # (a)
        assert rank["parameters"] * 2 == whole_parameters
        assert rank["losses"] == pytest.approx(losses, rel=1e-5)                                  # (b)
        gap = max_gap(rank["trained"], reference)                                                  # (c)
        print(f"4-bit FSDP2: losses {rank['losses']} vs {losses}, largest trainable-weight gap {gap:.1e}")
        assert gap < PARAM_TOLERANCE
        for name, (packed, state) in quantized.items():                                           # (d)
            got = rank["gathered"][name]
            assert got["dtype"] == torch.float32 and packed.dtype == torch.float32
            assert torch.equal(got["bytes"], packed.view(torch.uint8))
            assert torch.equal(got["dequantized"], bnbF.dequantize_4bit(packed, state))
    moved = min((reference[k] - initial[k]).abs().max().item() for k in reference)
    print(f"4-bit FSDP2: every trainable tensor moved at least {moved:.1e}")
    assert moved > 10 * PARAM_TOLERANCE
