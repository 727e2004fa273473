"""experiments/pretrain_llama.py as a careful command-line tool (issue 11, section 3)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

from lrgrad_experiments.pretrain.checkpoint import CheckpointStore, load_checkpoint  # noqa: E402
from lrgrad_experiments.pretrain_llama import build_parser, lr_lambda_factory, main, parse_args, run  # noqa: E402

BASE = ["--config", "llama_test", "--optimizer", "galore_adamw", "--batch-size", "4", "--seq-len", "32",
        "--eval-batches", "2", "--max-bytes", "120000", "--no-progress", "--threads", "1", "--max-steps", "4",
        "--eval-every", "2", "--update-proj-gap", "2"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _val_losses(out: Path) -> list[float]:
    return [json.loads(line)["val_loss"] for line in (out / "eval.jsonl").read_text().splitlines()]


def test_an_existing_run_is_not_overwritten_without_asking(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main([*BASE, "--quiet", "--out-dir", out]) == 0
    before = (tmp_path / "run" / "eval.jsonl").read_text()
    capsys.readouterr()
    assert main([*BASE, "--quiet", "--out-dir", out, "--lr", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: Invalid out-dir: {out!r} already holds a run")
    assert "--resume" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert (tmp_path / "run" / "eval.jsonl").read_text() == before  # untouched
    # --overwrite replaces it: the same as a run into a fresh folder
    assert main([*BASE, "--quiet", "--out-dir", out, "--overwrite"]) == 0
    fresh = tmp_path / "fresh"
    assert main([*BASE, "--quiet", "--out-dir", str(fresh)]) == 0
    assert _val_losses(tmp_path / "run") == _val_losses(fresh)
    assert [s for s, _ in CheckpointStore(tmp_path / "run").published()] == [4]
    with pytest.raises(ValueError, match="--resume with --overwrite"):
        parse_args([*BASE, "--out-dir", out, "--resume", "--overwrite"])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_prints_the_checkpoint_and_the_exact_resume_command(tmp_path, capsys, sig, monkeypatch):
    out = tmp_path / "run"
    argv = [*BASE, "--quiet", "--out-dir", str(out), "--opt-arg", "moment_policy=project", "--lr", "0.02"]

    def interrupt(step):
        if step == 2:
            os.kill(os.getpid(), sig)

    summary = run(parse_args(argv), on_step=interrupt)
    assert summary["stopped_by_signal"] == sig and summary["steps"] == 2
    err = capsys.readouterr().err.splitlines()
    folder = out / "checkpoints" / "step-00000002"
    assert err[0] == f"stopped by {sig.name} at step 2/4; checkpoint: {folder}"
    assert load_checkpoint(folder / "state.pt")["step"] == 2
    assert err[1].startswith("resume with: ")
    command = shlex.split(err[1].removeprefix("resume with: "))
    assert command[:2] == [sys.executable, "experiments/pretrain_llama.py"] or Path(command[1]).is_absolute()
    assert command[-1] == "--resume"
    # the command means this run: the same arguments, plus --resume
    assert vars(parse_args(command[2:])) == {**vars(parse_args(argv)), "resume": True}
    # and it works: running it finishes the run as an uninterrupted one would
    monkeypatch.chdir(ROOT)
    assert main(command[2:]) == 0
    full = tmp_path / "full"
    assert main([*argv[:argv.index("--out-dir")], "--out-dir", str(full), *argv[argv.index("--out-dir") + 2:]]) == 0
    assert _val_losses(out) == _val_losses(full)


def test_help_shows_every_default_exactly_once(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert text.count("(default:") == len(options)
    for action in options:
        assert action.help.count("(default:") == 1, action.dest
        if action.default not in (None, False, []) and "%(default)s" in action.help:
            assert f"(default: {action.default})" in " ".join(text.split()), action.dest
    flat = " ".join(text.split())
    for words in ("--lr LR peak lr (default: the recipe's)", "--weight-decay WEIGHT_DECAY decoupled "
                  "weight decay (default: the recipe's: 0 for galore-paper, the optimizer's for library)",
                  "--recipe {galore-paper,library} where the optimizer's unset defaults come from: 'galore-paper' "
                  "(the GaLore paper's pretraining recipe: lr 0.01",
                  "--keep-checkpoints KEEP_CHECKPOINTS keep the newest K checkpoint "
                  "folders (default: 2)", "--layerwise per-layer updates"):
        assert words in flat


def test_evaluations_are_printed_to_the_terminal(tmp_path, capsys):
    assert main([*BASE, "--out-dir", str(tmp_path / "a")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    records = [json.loads(line) for line in (tmp_path / "a" / "eval.jsonl").read_text().splitlines()]
    assert len(lines) == len(records) == 2
    for line, rec in zip(lines, records):
        assert line.startswith(f"step {rec['step']}/4: val loss {rec['val_loss']:.4f} (ppl {rec['val_ppl']:.2f}, ")
    # with the progress bar too (written above the bar)
    args = [a for a in BASE if a != "--no-progress"]
    assert main([*args, "--out-dir", str(tmp_path / "b")]) == 0
    captured = capsys.readouterr()
    assert sum(line.startswith("step ") for line in (captured.out + captured.err).splitlines()) == 2


def test_resume_with_a_new_lr_is_honoured_and_recorded(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*BASE, "--quiet", "--out-dir", str(out), "--max-steps", "6", "--stop-after", "2",
                 "--save-every", "2"]) == 0
    capsys.readouterr()
    assert main([*BASE, "--quiet", "--out-dir", str(out), "--max-steps", "6", "--resume", "--lr", "0.004"]) == 0
    err = capsys.readouterr().err
    assert "resume: --lr changed [0.01, 0.01] -> [0.004, 0.004] (honoured" in err
    # from step 3 on, the schedule runs at the new peak (the lr logged at step 4 and 6)
    schedule = lr_lambda_factory(6, 0.1, 0.1)
    records = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["lr"] for r in records}
    assert logged[2] == pytest.approx(0.01 * schedule(2))
    assert logged[4] == pytest.approx(0.004 * schedule(4)) and logged[6] == pytest.approx(0.004 * schedule(6))
    resumes = json.loads((out / "run.json").read_text())["resumes"]
    assert resumes == [{"step": 2, "checkpoint": "step-00000002",
                        "changed": {"lr": [[0.01, 0.01], [0.004, 0.004]], "save_every": [2, 0]}}]
    state = load_checkpoint(out / "checkpoints" / "step-00000006" / "state.pt")
    assert state["args"]["lr"] == [0.004, 0.004] and state["resumes"] == resumes


@pytest.mark.parametrize("flag,value,old", [("--update-proj-gap", "3", "[2]"), ("--batch-size", "2", "4"),
                                            ("--seq-len", "16", "32")])
def test_resume_with_a_changed_data_or_subspace_argument_is_refused(tmp_path, capsys, flag, value, old):
    out = tmp_path / "run"
    assert main([*BASE, "--quiet", "--out-dir", str(out), "--stop-after", "2"]) == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir()), (out / "eval.jsonl").read_text()
    capsys.readouterr()
    assert main([*BASE, "--quiet", "--out-dir", str(out), "--resume", flag, value]) == 2
    err = capsys.readouterr().err.strip()
    shown = f"[{value}]" if flag == "--update-proj-gap" else value
    assert len(err.splitlines()) == 1
    assert f"{flag} was {old}, now {shown}" in err and "resume with the checkpoint's values" in err
    assert (sorted(p.name for p in (out / "checkpoints").iterdir()), (out / "eval.jsonl").read_text()) == before


def test_the_recipe_decides_the_unset_defaults():
    """``--recipe galore-paper`` (the default): the paper's lr 0.01, scale 0.25, no weight decay;
    ``--recipe library``: exactly what the class builds by itself (lr 1e-3, wd 0.01, RMS-matched scale);
    explicit values win over either (issue 29.7)."""
    from lrgrad_experiments.pretrain.configs import build_model
    from lrgrad_experiments.pretrain.optimizers import build_optimizer

    import lrgrad

    model = build_model("llama_test", vocab_size=64, max_seq_len=32)
    paper = build_optimizer("galore_adamw", model, rank=8)
    assert (paper.defaults["lr"], paper.defaults["weight_decay"], paper.param_groups[0]["scale"]) == (1e-2, 0.0, 0.25)
    library = build_optimizer("galore_adamw", model, rank=8, recipe="library")
    direct = lrgrad.GaLoreAdamW(lrgrad.param_groups(model, rank=8), lr=1e-3)
    assert library.defaults == direct.defaults
    assert [{k: v for k, v in g.items() if k not in ("params", "param_names")} for g in library.param_groups] == [
        {k: v for k, v in g.items() if k not in ("params", "param_names")} for g in direct.param_groups]
    mini = build_optimizer("apollo_mini_adamw", model, rank=8, recipe="library")
    assert (mini.param_groups[0]["rank"], mini.param_groups[0]["scale"]) == (1, 128**0.5)
    torch_adamw = build_optimizer("adamw", model, recipe="library")
    assert (torch_adamw.defaults["lr"], torch_adamw.defaults["weight_decay"]) == (1e-3, 1e-2)
    assert build_optimizer("galore_adamw", model, rank=8, recipe="library", lr=3e-3).defaults["lr"] == 3e-3
    assert parse_args(["--recipe", "library"]).weight_decay is None  # the optimizer's own
    assert parse_args([]).weight_decay == 0.0  # the paper's, recorded in run.json
    with pytest.raises(ValueError, match="recipe"):
        build_optimizer("galore_adamw", model, rank=8, recipe="paper")


def test_the_readme_says_which_recipe_the_cli_follows():
    flat = " ".join((ROOT / "README.md").read_text().split())
    assert "`--recipe galore-paper`: lr 0.01, scale 0.25, weight decay 0" in flat
    assert "`--recipe library` gives every optimizer its own defaults" in flat


def test_a_finished_run_destroys_the_group_it_made_and_no_other(tmp_path, monkeypatch):
    """torch asks every process to destroy its group before exit (one left to interpreter finalization can
    abort the process after the work is done): main() destroys the group its run made (torchrun's env://),
    not one its caller made (it may still need it), and not after an error exit (another rank may still wait
    in a collective). One process, world size 1, gloo over env:// as torchrun sets it."""
    import torch.distributed as dist
    from harness import free_port

    closed = []
    real_destroy = dist.destroy_process_group
    monkeypatch.setattr(dist, "destroy_process_group", lambda: closed.append(True) or real_destroy())
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    # WORLD_SIZE=2 makes the run init a group; the store then waits for a rank 1: init a world of 1 instead
    real_init = dist.init_process_group
    monkeypatch.setattr(dist, "init_process_group", lambda backend=None, **k: real_init(
        backend, store=dist.FileStore(str(tmp_path / f"store{len(closed)}"), 1), rank=0, world_size=1))
    try:
        assert main([*BASE, "--quiet", "--out-dir", str(tmp_path / "a"), "--parallel", "ddp"]) == 0
        assert closed == [True] and not dist.is_initialized()  # the run made it: destroyed
        assert main([*BASE, "--quiet", "--out-dir", str(tmp_path / "a"), "--parallel", "ddp"]) == 2  # run exists
        assert closed == [True] and dist.is_initialized()  # an error exit leaves it
        assert main([*BASE, "--quiet", "--out-dir", str(tmp_path / "b"), "--parallel", "ddp"]) == 0
        assert closed == [True] and dist.is_initialized()  # the caller's group (made before main): left
    finally:
        if dist.is_initialized():
            real_destroy()
