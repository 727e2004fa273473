"""experiments/bench/long_run.py: the queue's order, runs in chunks equal to runs in one go, and the report's
crossing steps and win/loss verdicts (called only beyond the seed spread)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from lrgrad_experiments.bench import long_run
from lrgrad_experiments.bench import long_run_report as report


def _opts(tmp_path: Path, *extra: str):
    return long_run.build_parser().parse_args(["--out-root", str(tmp_path / "runs"), "--results",
                                               str(tmp_path / "results"), *extra])


def test_queue_starts_with_the_most_informative_runs(tmp_path):
    queue, best = long_run.build_queue(_opts(tmp_path))
    assert best is None  # no sweep finished: no best-lr runs queued yet
    first = [(s.method, s.lr, s.seed, s.role) for s in queue[:6]]
    assert first == [("adamw", 3e-3, 0, "paper"), ("adamw", 1e-3, 0, "sweep"), ("adamw", 3e-3, 0, "sweep"),
                     ("adamw", 1e-2, 0, "sweep"), ("galore_adamw", 1e-2, 0, "paper"),
                     ("apollo_mini_adamw", 1e-2, 0, "paper")]
    roles = [s.role for s in queue]
    first_seed1 = next(i for i, s in enumerate(queue) if s.seed == 1)
    assert set(roles[:first_seed1]) == {"paper", "sweep"} and roles.index("sweep") < first_seed1
    assert all(s.steps == 2000 for s in queue if s.role == "paper")
    assert len({s.tag for s in queue}) == len(queue)
    # a finished sweep (1e-3 best) adds the best-lr runs after every seed's paper-default runs
    opts = _opts(tmp_path)
    for lr, loss in zip(opts.sweep_lrs, (2.0, 2.1, 2.2)):
        folder = long_run.run_dir(opts, long_run.RunSpec("adamw", lr, 0, opts.sweep_steps, "sweep"))
        folder.mkdir(parents=True)
        (folder / "done.json").write_text(json.dumps({"final_val_loss": loss}))
    queue, best = long_run.build_queue(opts)
    roles = [s.role for s in queue]
    # AdamW at the best lr right after each of its own runs (the fair baseline of each seed), every other
    # best-lr run after all the paper runs
    assert best == 1e-3 and (queue[4].method, queue[4].lr, queue[4].role) == ("adamw", 1e-3, "best")
    for i, spec in enumerate(queue):
        if spec.role == "best" and spec.method == "adamw":
            assert (queue[i - 1].method, queue[i - 1].seed, queue[i - 1].role) in {("adamw", spec.seed, "paper"),
                                                                                 ("adamw", spec.seed, "sweep")}
    others_best = [i for i, s in enumerate(queue) if s.role == "best" and s.method != "adamw"]
    assert min(others_best) > max(i for i, r in enumerate(roles) if r == "paper")
    # the methods the papers compare run with every seed before any other method starts (verdicts first)
    core_runs = [i for i, s in enumerate(queue) if s.role == "paper" and s.method in long_run.VERDICT_FIRST]
    rest_runs = [i for i, s in enumerate(queue) if s.role == "paper" and s.method not in long_run.VERDICT_FIRST]
    assert len(core_runs) == 2 * len(long_run.VERDICT_FIRST) and max(core_runs) < min(rest_runs)
    assert [s.seed for s in queue if s.role == "paper" and s.method not in long_run.VERDICT_FIRST] == sorted(
        s.seed for s in queue if s.role == "paper" and s.method not in long_run.VERDICT_FIRST)  # seed by seed
    assert len({s.method for s in queue if s.role == "paper"}) == len(long_run.METHOD_ORDER)
    # a method whose own lr is the best one has its paper run stand for its best-lr run
    separate = [m for m in long_run.METHOD_ORDER if long_run.paper_lr(m) != 1e-3]
    assert "adamw" in separate and len(separate) < len(long_run.METHOD_ORDER)
    assert [(s.method, s.seed) for s in queue if s.role == "best"] == [("adamw", 0), ("adamw", 1)] + [
        (m, seed) for seed in (0, 1) for m in separate if m != "adamw"]


def _tiny(tmp_path: Path, name: str, chunk: int) -> list[str]:
    return ["--config", "llama_test", "--methods", "adamw", "galore_adamw", "--seeds", "0", "--steps", "6",
            "--batch-size", "2", "--seq-len", "32", "--eval-every", "2", "--eval-batches", "2",
            "--sweep-lrs", "0.001", "0.003", "--sweep-steps", "4", "--chunk-steps", str(chunk), "--save-every", "2",
            "--data", str(tmp_path / "text"), "--out-root", str(tmp_path / name), "--results",
            str(tmp_path / f"{name}-results")]


def test_runs_in_chunks_equal_runs_in_one_go_and_fill_the_report(tmp_path, monkeypatch):
    text = tmp_path / "text"
    text.mkdir()
    for i in range(6):  # a small byte-level corpus (split by file)
        (text / f"f{i}.txt").write_text(" ".join(f"word{j % (7 + i)} value{j % 5}" for j in range(3000)))
    assert long_run.main(_tiny(tmp_path, "chunked", chunk=2)) == 0
    assert long_run.main(_tiny(tmp_path, "whole", chunk=100)) == 0
    runs = sorted(p.name for p in (tmp_path / "chunked").iterdir() if not p.name.startswith("."))  # not the locks
    # paper runs, the sweep, and the best-lr runs that follow it (AdamW's best-lr run is its paper run or not)
    assert {"adamw-lr0.003-s0-6", "galore_adamw-lr0.01-s0-6", "adamw-lr0.001-s0-4", "adamw-lr0.003-s0-4"} <= set(runs)
    best = long_run.best_sweep_lr(long_run.build_parser().parse_args(_tiny(tmp_path, "chunked", 2)))
    assert best in (0.001, 0.003) and f"galore_adamw-lr{best:g}-s0-6" in runs
    for name in runs:
        chunked = (tmp_path / "chunked" / name / "eval.jsonl").read_text().splitlines()
        whole = (tmp_path / "whole" / name / "eval.jsonl").read_text().splitlines()
        assert [json.loads(x)["val_loss"] for x in chunked] == [json.loads(x)["val_loss"] for x in whole], name
        chunks = (tmp_path / "chunked" / name / "chunks.jsonl").read_text().splitlines()
        assert len(chunks) == (3 if name.endswith("-6") else 2)  # 6 steps in chunks of 2, the sweep's 4
    md = (tmp_path / "chunked-results" / "long_run.md").read_text()
    assert "Runs finished: " in md and "| GaLore-AdamW (`galore_adamw`) | 0.01 | 1/1 |" in md
    assert "All finished; the command that ran them" in md and "Continue (" not in md  # nothing left to continue
    assert "1 seed: no spread yet" in md and f"AdamW's best lr ({best:g})" in md
    assert (tmp_path / "chunked-results" / "long_run.png").stat().st_size > 0
    # a second invocation finds everything done and runs nothing
    assert long_run.main(_tiny(tmp_path, "chunked", chunk=2)) == 0
    assert len((tmp_path / "chunked" / "galore_adamw-lr0.01-s0-6" / "chunks.jsonl").read_text().splitlines()) == 3

    # a fresh clone has the committed results but no run folders: the finished runs are restored from
    # long_run.json, nothing trains again, and the rewritten report is the same
    before = (tmp_path / "chunked-results" / "long_run.md").read_text()
    before_runs = json.loads((tmp_path / "chunked-results" / "long_run.json").read_text())["runs"]
    shutil.rmtree(tmp_path / "chunked")
    trained = []
    monkeypatch.setattr(long_run, "run_chunk", lambda opts, spec: trained.append(spec.tag))
    assert long_run.main(_tiny(tmp_path, "chunked", chunk=2)) == 0
    assert trained == [] and sorted(p.name for p in (tmp_path / "chunked").iterdir()
                                    if not p.name.startswith(".")) == runs
    assert (tmp_path / "chunked-results" / "long_run.md").read_text() == before
    after_runs = json.loads((tmp_path / "chunked-results" / "long_run.json").read_text())["runs"]
    assert [(r["tag"], r["done"], r["history"], r["chunks"]) for r in after_runs] == [
        (r["tag"], r["done"], r["history"], r["chunks"]) for r in before_runs]
    # results of a queue with other run options (here: more steps) are other runs: nothing is restored
    shutil.rmtree(tmp_path / "chunked")
    longer = _tiny(tmp_path, "chunked", chunk=2)
    longer[longer.index("--steps") + 1] = "8"
    assert long_run.restore_finished(long_run.build_parser().parse_args(longer)) == []
    assert not (tmp_path / "chunked").exists()


def test_crossing_names_the_last_crossing():
    base = {100: 3.0, 200: 2.5, 300: 2.2, 400: 2.0}
    assert report.crossing({100: 2.9, 200: 2.4, 300: 2.1, 400: 1.9}, base) == "below from the first eval"
    assert report.crossing({100: 3.1, 200: 2.6, 300: 2.1, 400: 1.9}, base) == "below from step 300"
    assert report.crossing({100: 2.9, 200: 2.6, 300: 2.1, 400: 2.1}, base) == "above from step 400"


def _run(method: str, seed: int, final: float, role: str = "paper", lr: float = 0.01) -> dict:
    history = [{"step": 100, "val_loss": final + 0.5}, {"step": 200, "val_loss": final}]
    return {"spec": {"method": method, "lr": lr, "seed": seed, "steps": 200, "role": role}, "done": True,
            "history": history, "chunks": [{"step_time_s": 1.0, "params": 10}]}


def test_a_win_is_called_only_beyond_both_seed_spreads():
    adamw = [_run("adamw", 0, 2.00, lr=0.003), _run("adamw", 1, 2.02, lr=0.003)]
    clear = [_run("galore_adamw", 0, 1.90), _run("galore_adamw", 1, 1.91)]  # -0.105, spreads 0.01 + 0.02
    lines, numbers = report.table(adamw + clear, "paper", [0, 1])
    row = next(line for line in lines if "`galore_adamw`" in line)
    assert "**win**" in row and "-0.1050" in row
    close = [_run("galore_adamw", 0, 1.99), _run("galore_adamw", 1, 2.03)]  # -0.000, spreads 0.04 + 0.02
    lines, _ = report.table(adamw + close, "paper", [0, 1])
    row = next(line for line in lines if "`galore_adamw`" in line)
    assert "within seed spread" in row and "**win**" not in row
    worse = [_run("galore_adamw", 0, 2.20), _run("galore_adamw", 1, 2.21)]
    lines, _ = report.table(adamw + worse, "paper", [0, 1])
    assert "**loss**" in next(line for line in lines if "`galore_adamw`" in line)
    assert numbers[1]["paired_deltas"] == pytest.approx([-0.10, -0.11])


def test_a_running_seed_does_not_cut_the_finished_seeds_curve():
    """The curve column reads the finished seeds' mean curve; a second seed still at its first eval (above
    AdamW there, as every run starts) must not reduce it to that one step."""
    adamw = [_run("adamw", 0, 2.00, lr=0.003), _run("adamw", 1, 2.02, lr=0.003)]
    finished = _run("galore_adamw", 0, 1.90)
    finished["history"] = [{"step": 100, "val_loss": 2.6}, {"step": 200, "val_loss": 1.90}]  # above, then below
    running = {**_run("galore_adamw", 1, 2.0), "done": False, "history": [{"step": 100, "val_loss": 2.7}]}
    _, numbers = report.table(adamw + [finished, running], "paper", [0, 1])
    assert numbers[1]["crossing"] == "below from step 200"
    _, numbers = report.table(adamw + [running], "paper", [0, 1])  # no seed finished: the running one's
    assert numbers[1]["crossing"] == "above from the first eval"


def test_the_report_says_continue_until_every_run_is_finished(tmp_path):
    opts = _opts(tmp_path, "--methods", "adamw", "galore_adamw", "--seeds", "0", "1")
    runs = [_run("adamw", 0, 2.00, lr=0.003), _run("adamw", 1, 2.02, lr=0.003), _run("galore_adamw", 0, 1.9)]
    running = {**_run("galore_adamw", 1, 2.0), "done": False, "history": [{"step": 100, "val_loss": 2.7}]}
    md = report.write(tmp_path / "results", opts, runs + [running], 0.003, "long_run.py").read_text()
    assert "Runs finished: 3 of 4 queued. Continue (resumes every unfinished run" in md and "All finished" not in md
    md = report.write(tmp_path / "results", opts, runs, 0.003, "long_run.py").read_text()
    assert "Runs finished: 3 of 3 queued. All finished" in md and "Continue (" not in md
    md = report.write(tmp_path / "results", opts, runs, None, "long_run.py").read_text()  # the sweep unfinished
    assert "join the queue when the sweep finishes). Continue (" in md


def test_paper_runs_against_tuned_adamw_pair_each_seed_with_adamws_best_lr_run():
    """The table of paper-lr runs against tuned AdamW: each seed paired with AdamW's run at the best lr (not its
    paper-lr run, which becomes a row), and a verdict that may differ from the one against AdamW's paper lr."""
    paper_adamw = [_run("adamw", 0, 2.00, lr=0.003), _run("adamw", 1, 1.80, lr=0.003)]  # unstable: spread 0.2
    tuned = [_run("adamw", 0, 1.35, role="best", lr=0.001), _run("adamw", 1, 1.37, role="best", lr=0.001)]
    galore = [_run("galore_adamw", 0, 1.29), _run("galore_adamw", 1, 1.30)]
    apollo = [_run("apollo_adamw", 0, 1.40)]  # one seed: paired with seed 0's tuned run only
    runs = paper_adamw + tuned + galore + apollo
    baseline = report.tuned_adamw(runs, 0.001)
    assert {s: r["spec"]["lr"] for s, r in baseline.items()} == {0: 0.001, 1: 0.001}
    assert report.tuned_adamw(runs, None) == {}
    lines, numbers = report.table(runs, "paper", [0, 1], baseline=baseline)
    by = {n["method"]: n for n in numbers}
    assert by["galore_adamw"]["paired_deltas"] == pytest.approx([-0.06, -0.07])
    assert "**win**" in next(line for line in lines if "`galore_adamw`" in line)  # 0.065 > 0.01 + 0.02
    assert by["adamw"]["paired_deltas"] == pytest.approx([0.65, 0.43])  # AdamW's paper lr is a row here
    assert "**loss**" in next(line for line in lines if "`adamw`" in line)
    assert by["apollo_adamw"]["paired_deltas"] == pytest.approx([0.05])
    assert "1 seed: no spread yet" in next(line for line in lines if "`apollo_adamw`" in line)
    # against AdamW's own paper lr the same GaLore runs are a win by far more, AdamW's row has no delta
    lines, numbers = report.table(runs, "paper", [0, 1])
    by = {n["method"]: n for n in numbers}
    assert by["galore_adamw"]["paired_deltas"] == pytest.approx([-0.71, -0.50])
    assert "| — | — |" in next(line for line in lines if "`adamw`" in line)  # no delta, no verdict


def test_a_diverged_run_is_a_result_and_the_queue_goes_on(tmp_path, monkeypatch):
    """A method whose loss goes non-finite is marked diverged (in the table) and the next run starts."""
    real_run = long_run.run

    def run(args):
        if args.optimizer == "galore_adamw":
            raise FloatingPointError("training loss became nan at step 3")
        return real_run(args)

    monkeypatch.setattr(long_run, "run", run)
    text = tmp_path / "text"
    text.mkdir()
    for i in range(4):
        (text / f"f{i}.txt").write_text(" ".join(f"word{j % (5 + i)}" for j in range(3000)))
    argv = [*_tiny(tmp_path, "q", chunk=100), "--sweep-lrs", "0.003"]
    assert long_run.main(argv) == 0
    opts = long_run.build_parser().parse_args(argv)
    galore = long_run.RunSpec("galore_adamw", 0.01, 0, 6, "paper")
    assert long_run.read_done(opts, galore)["diverged"] == "training loss became nan at step 3"
    queue, best = long_run.build_queue(opts)
    assert best == 0.003 and all(long_run.is_done(opts, s) for s in queue)  # the queue went on to the end
    md = (tmp_path / "q-results" / "long_run.md").read_text()
    assert "**diverged** (seed 0: training loss became nan at step 3)" in md


def test_a_claimed_run_is_skipped_by_other_workers_until_released(tmp_path):
    opts = _opts(tmp_path)
    queue, _ = long_run.build_queue(opts)
    first, fd = long_run.claim_next(opts)
    assert first == queue[0]
    assert long_run.claim(opts, first) is None  # a second claim of the same run fails, even in this process
    second, fd2 = long_run.claim_next(opts)  # another worker gets the next run, not the claimed one
    assert second == queue[1]
    long_run.release(fd)
    again, fd3 = long_run.claim_next(opts)
    assert again == first  # released: the first unfinished run is claimable again
    for f in (fd2, fd3):
        long_run.release(f)
    # a run finished while claimed is never handed out again
    folder = long_run.run_dir(opts, first)
    folder.mkdir(parents=True)
    (folder / "done.json").write_text(json.dumps({"final_val_loss": 2.0}))
    assert long_run.claim_next(opts)[0] == queue[1]


@pytest.mark.parametrize("workers", [2])
def test_parallel_workers_train_every_run_once_with_the_same_losses(tmp_path, workers, monkeypatch):
    # started as a user would, from the repository root without the test session's PYTHONSAFEPATH: the
    # workers must not import the root's kernels/ folder in place of Hugging Face's `kernels`
    monkeypatch.delenv("PYTHONSAFEPATH", raising=False)
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    text = tmp_path / "text"
    text.mkdir()
    for i in range(6):
        (text / f"f{i}.txt").write_text(" ".join(f"word{j % (7 + i)} value{j % 5}" for j in range(3000)))
    assert long_run.main(_tiny(tmp_path, "serial", chunk=3)) == 0
    argv = [*_tiny(tmp_path, "parallel", chunk=3), "--workers", str(workers), "--poll-seconds", "0.2"]
    assert long_run.main(argv) == 0
    serial = sorted(p.name for p in (tmp_path / "serial").iterdir() if not p.name.startswith("."))
    parallel = sorted(p.name for p in (tmp_path / "parallel").iterdir() if not p.name.startswith("."))
    assert serial == parallel and len(serial) >= 4
    for name in serial:
        a = (tmp_path / "serial" / name / "eval.jsonl").read_text().splitlines()
        b = (tmp_path / "parallel" / name / "eval.jsonl").read_text().splitlines()
        assert [json.loads(x)["val_loss"] for x in a] == [json.loads(x)["val_loss"] for x in b], name
        chunks = (tmp_path / "parallel" / name / "chunks.jsonl").read_text().splitlines()
        assert len(chunks) == 2  # 6 steps in chunks of 3 (the sweep's 4 too): no chunk trained twice
    md = (tmp_path / "parallel-results" / "long_run.md").read_text()
    assert "Runs finished: " in md and f"--workers {workers}" in md and "--as-worker" not in md  # how to continue
    assert f"{workers} runs at once" in md
