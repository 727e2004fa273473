"""experiments/reproduce.py end to end at tiny scale: the real C4 pipeline (tokenize, pack, evaluate, table)
with a local folder of text files and a tokenizer built here, so nothing is downloaded.

One process (resume after --stop-after continues bit-identically) and 2 processes under gloo (DDP and
FSDP2, each stopped and resumed: the one-process row's losses).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import harness
import pytest
from lrgrad_experiments import reproduce
from lrgrad_experiments.pretrain import recipes

pytest.importorskip("tokenizers")

WORDS = ("model optimizer gradient projection subspace rank memory train token layer matrix step loss "
         "value data batch basis refresh moment scale weight update").split()


def _write_corpus(root: Path) -> None:
    """Twelve documents of seeded pseudo-text (enough for a 32-token window batch of 4, split by file)."""
    import random

    rng = random.Random(0)
    root.mkdir()
    for i in range(12):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "."
                     for _ in range(60)]
        (root / f"doc{i:02d}.txt").write_text(" ".join(sentences))


def _write_tokenizer(corpus: Path, out: Path) -> None:
    """A byte-level BPE tokenizer trained on ``corpus`` and saved as a Hugging Face folder (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train([str(p) for p in sorted(corpus.iterdir())],
              trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"]))
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(out))


@pytest.fixture(scope="module")
def local_c4(tmp_path_factory):
    root = tmp_path_factory.mktemp("local_c4")
    _write_corpus(root / "text")
    _write_tokenizer(root / "text", root / "tokenizer")
    return root / "text", root / "tokenizer"


def _argv(local_c4, out_root: Path, results: Path, *extra: str) -> list[str]:
    text, tokenizer = local_c4
    return ["--paper", "galore", "--method", "galore_adamw", "--size", "60m", "--config", "llama_test",
            "--steps", "6", "--global-batch", "4", "--micro-batch", "2", "--seq-len", "32", "--rank", "8",
            "--eval-tokens", "256", "--eval-every", "2", "--save-every", "2", "--data", str(text),
            "--tokenizer", str(tokenizer), "--out-root", str(out_root), "--results", str(results),
            "--threads", "1", "--device", "cpu", "--quiet", *extra]


def _val_losses(row_dir: Path) -> list[float]:
    return [json.loads(line)["val_loss"] for line in (row_dir / "eval.jsonl").read_text().splitlines()]


def test_the_plan_is_the_protocol_and_prints_the_estimate(capsys):
    assert reproduce.main(["--paper", "galore", "--method", "galore_adamw", "--size", "60m", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "10000 steps x 512 x 256 tokens = 1.31B tokens" in out
    assert "micro-batch 256 x 1 process(es) x accumulation 2" in out
    assert "lr 0.01, rank 128, scale 0.25, gap 200" in out and "clip 0" in out
    assert "estimated:" in out and "GiB per GPU" in out
    opts = reproduce.build_parser().parse_args(["--paper", "galore", "--method", "galore_adamw", "--size", "1b"])
    p = reproduce.plan(opts, world=8)
    assert (p["rank"], p["micro_batch"], p["grad_accum"], p["steps"]) == (1024, 16, 4, 100_000)
    assert p["eval_batches"] == math.ceil(10_000_000 / (16 * 8 * 256)) and not p["deviations"]
    with pytest.raises(ValueError, match="method"):
        recipes.get_recipe("galore", "muon")


def test_row_runs_resumes_bit_identically_and_writes_the_table(local_c4, tmp_path):
    # uninterrupted reference
    assert reproduce.main(_argv(local_c4, tmp_path / "ref", tmp_path / "ref-results")) == 0
    (ref_dir,) = (tmp_path / "ref").iterdir()
    reference = _val_losses(ref_dir)
    assert len(reference) == 3 and reference[-1] < reference[0]
    # the same row in two invocations: --stop-after 3, then the same command without it resumes
    out, results = tmp_path / "runs", tmp_path / "results"
    assert reproduce.main(_argv(local_c4, out, results, "--stop-after", "3")) == 0
    (row_dir,) = out.iterdir()
    assert "| 3 / 6 (partial) |" in (results / "reproduce.md").read_text()
    assert reproduce.main(_argv(local_c4, out, results)) == 0
    assert _val_losses(row_dir) == reference  # bit-identical continuation
    table = (results / "reproduce.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| galore | galore_adamw | 60m"))
    assert "| 6 / 6 |" in row and f"{math.exp(reference[-1]):.2f}" in row and "34.88" in row
    assert "'config': 'llama_test'" in row  # the deviations are named, and no gap is claimed for them
    plan = json.loads((row_dir / "row.json").read_text())["plan"]
    assert plan["grad_accum"] == 2 and plan["eval_batches"] == 256 // (2 * 32)  # eval tokens / (batch x seq)


def _two_process_row(rank: int, world: int, argv: list[str], mode: str) -> list[float]:
    import os

    from lrgrad_experiments import reproduce

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # what torchrun sets
    assert reproduce.main([*argv, "--parallel", mode, "--stop-after", "3"]) == 0
    assert reproduce.main([*argv, "--parallel", mode]) == 0  # resumes
    (row_dir,) = Path(argv[argv.index("--out-root") + 1]).iterdir()
    return _val_losses(row_dir)


# FSDP2's refresh takes the basis from a sharded Gram matrix (other rounding than one process's SVD)
@pytest.mark.parametrize("mode, rel", [("ddp", 1e-4), ("fsdp2", 5e-4)])
def test_two_processes_under_gloo_follow_one_process(local_c4, tmp_path, mode, rel):
    argv = _argv(local_c4, tmp_path / "single", tmp_path / "single-results", "--micro-batch", "1")
    assert reproduce.main(argv) == 0
    (single_dir,) = (tmp_path / "single").iterdir()
    single = _val_losses(single_dir)
    pair = _argv(local_c4, tmp_path / "ddp", tmp_path / "ddp-results", "--micro-batch", "1")
    losses = harness.run_distributed(_two_process_row, pair, mode)
    assert losses[0] == losses[1]  # every rank saw the same evaluation
    assert losses[0] == pytest.approx(single, rel=rel)  # the global batch's gradient, in two halves
    plan = json.loads(next((tmp_path / "ddp").iterdir()).joinpath("row.json").read_text())["plan"]
    assert (plan["world"], plan["micro_batch"], plan["grad_accum"]) == (2, 1, 2)


def test_gpu_rows_splits_its_minutes_between_a_calibration_and_the_steps_that_fit(tmp_path, monkeypatch):
    """experiments/tools/gpu_rows.py without a GPU: reproduce.main is replaced by a recorder that writes the
    row.json a real chunk would (0.5 s a step), so the arithmetic of the budget is what is checked."""
    from lrgrad_experiments.tools import gpu_rows

    calls = []

    def fake_main(argv):
        calls.append(argv)
        method = argv[argv.index("--method") + 1]
        row = Path(argv[argv.index("--out-root") + 1]) / f"galore-{method}-60m-s0-custom-x"
        row.mkdir(parents=True, exist_ok=True)
        (row / "row.json").write_text(json.dumps({"run": {"step_time_s": 0.5}}))
        return 0

    monkeypatch.setattr(gpu_rows.reproduce, "main", fake_main)
    monkeypatch.setattr(gpu_rows, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(gpu_rows.importlib.util, "find_spec", lambda name: object())  # as if datasets were there
    assert gpu_rows.main(["--minutes", "2", "--out-root", str(tmp_path)]) == 0
    assert [c[c.index("--method") + 1] for c in calls] == ["adamw", "adamw", "galore_adamw", "galore_adamw"]
    stops = [int(c[c.index("--stop-after") + 1]) for c in calls]
    assert stops[0] == stops[2] == gpu_rows.CALIBRATION_STEPS
    # each method gets half of 120 s; 90% of what is left of it at 0.5 s a step
    assert 100 <= stops[1] <= 108 and 100 <= stops[3] <= 108
    assert all(c[c.index("--paper") + 1] == "galore" and c[c.index("--size") + 1] == "60m" for c in calls)
    assert all("--data" not in c for c in calls)  # the hub answers: C4, the protocol's data


class _Streamed(list):
    """A list of documents with ``skip`` (what a streamed Hugging Face dataset offers)."""

    skipped: list[int] = []

    def skip(self, n):
        _Streamed.skipped.append(n)
        return iter(self[n:])


@pytest.mark.parametrize("streamed", [False, True])
def test_the_tokenized_stream_resumes_from_its_place_without_reading_it_again(local_c4, monkeypatch, streamed):
    from lrgrad_experiments.pretrain.data import C4Stream

    text, tokenizer = local_c4
    monkeypatch.setattr(C4Stream, "DOCS_PER_CALL", 2)  # several tokenizer calls in a short stream

    def stream():
        s = C4Stream(2, 32, seed=3, tokenizer=str(tokenizer), source=str(text))
        if streamed:
            s.dataset = _Streamed(s.dataset)
            s._start(0, [])
        return s

    a = stream()
    for _ in range(20):
        a.next()
    state = a.state_dict()
    assert 0 < state["docs"] < len(a.dataset) and state["buffer"]  # mid-stream, with tokens pending
    expected = [a.next() for _ in range(60)]  # past the pending tokens: new documents are read
    calls = {}
    for how, saved in (("from its place", state), ("read again", {"position": state["position"]})):
        b = stream()
        counter = {"n": 0}
        original = b.tokenizer.__class__.__call__
        monkeypatch.setattr(b.tokenizer.__class__, "__call__", _counting(original, counter))
        b.load_state_dict(saved)
        got = [b.next() for _ in range(60)]
        monkeypatch.setattr(b.tokenizer.__class__, "__call__", original)
        assert all((x == y).all() for x, y in zip(got, expected)) and b.position == 80, how
        calls[how] = counter["n"]
    # the saved place tokenizes only what follows it; a state without it re-tokenizes the first 20 batches
    assert calls["from its place"] < calls["read again"]
    if streamed:
        assert _Streamed.skipped[-1] == state["docs"]


def _counting(fn, counter):
    def wrapper(self, *args, **kwargs):
        counter["n"] += 1
        return fn(self, *args, **kwargs)
    return wrapper
