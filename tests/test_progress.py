"""course_lib.progress: text progress in a notebook (the same line every run), tqdm elsewhere; the
model loaders turn off the hub's and transformers' own bars (widgets frozen at "0%" once saved)."""

from course_lib import models, progress


def test_text_progress_prints_each_quarter_on_one_line(capsys):
    items = list(progress.TextProgress(range(6), "SmolLM2 LoRA"))
    assert items == list(range(6))
    # quarters of 6 steps, rounded up: 1.5 -> 2, 3, 4.5 -> 5, 6
    assert capsys.readouterr().out == "SmolLM2 LoRA: 2/6 3/6 5/6 6/6\n"


def test_text_progress_of_few_items_and_no_items(capsys):
    list(progress.TextProgress(range(2), "two"))
    list(progress.TextProgress([], "none", total=0))
    assert capsys.readouterr().out == "two: 1/2 2/2\nnone:\n"


def test_outside_a_notebook_it_is_a_tqdm_bar_on_stderr(capsys):
    assert not progress.in_notebook()          # pytest, not a Jupyter kernel
    bar = progress.progress(range(3), "steps")
    assert list(bar) == [0, 1, 2]
    bar.set_postfix(loss="1.000")
    captured = capsys.readouterr()
    assert captured.out == "" and "steps" in captured.err and "3/3" in captured.err


def test_in_a_kernel_it_is_text(monkeypatch, capsys):
    import IPython

    class ZMQInteractiveShell:   # the class name of IPython's shell in a Jupyter kernel
        pass

    monkeypatch.setattr(IPython, "get_ipython", ZMQInteractiveShell)
    bar = progress.progress(range(4), "train")
    assert isinstance(bar, progress.TextProgress)
    list(bar)
    assert capsys.readouterr().out == "train: 1/4 2/4 3/4 4/4\n"


def test_disabled_progress_prints_nothing(capsys):
    assert list(progress.progress(range(3), "quiet", disable=True)) == [0, 1, 2]
    assert capsys.readouterr() == ("", "")


def test_loaders_turn_off_the_hub_and_transformers_bars():
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    enable_progress_bars()
    hf_logging.enable_progress_bar()
    models.quiet_progress_bars()
    assert are_progress_bars_disabled() and not hf_logging.is_progress_bar_enabled()


def test_the_gguf_reader_bar_is_off_inside_the_block_and_back_after():
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    with models.quiet_gguf_conversion():
        bar = gguf_utils.tqdm(range(3), desc="Converting")
        assert bar.disable and list(bar) == [0, 1, 2]
    assert gguf_utils.tqdm is original
