"""Fault trial: try to lose or corrupt a pretraining run, and count what it survived.

    python experiments/tools/fault_trial.py                 # ~1-3 min on a laptop CPU
    python experiments/tools/fault_trial.py --real-kills 5 --parallel   # more real kills, and DDP/FSDP2 under torchrun

Prints a markdown table (faults tried / survived) for docs/faults.md. "Survived" means: the run
resumed and ended **bit-identical** to an uninterrupted run (every weight, every training loss, the
eval log), or a damaged checkpoint was refused before anything was unpickled with exit code 2 and
one line naming the file. Every trial runs experiments/pretrain_llama.py's real code path on a tiny
LLaMA (``llama_test``) for 4 steps with a checkpoint every 2 and ``--keep-checkpoints 1``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lrgrad_experiments.paths import PRETRAIN_SCRIPT as SCRIPT  # noqa: E402
from lrgrad_experiments.paths import REPO as ROOT  # noqa: E402
from lrgrad_experiments.pretrain import checkpoint as ckpt  # noqa: E402
from lrgrad_experiments.pretrain_llama import main, parse_args, run  # noqa: E402

from lrgrad.distributed import CheckpointError, load_checkpoint, save_checkpoint, write_manifest  # noqa: E402

TINY = ["--config", "llama_test", "--optimizer", "galore_adamw", "--batch-size", "4", "--seq-len", "32",
        "--eval-batches", "2", "--max-bytes", "120000", "--no-progress", "--quiet", "--threads", "1",
        "--max-steps", "4", "--eval-every", "2", "--save-every", "2", "--keep-checkpoints", "1",
        "--update-proj-gap", "2"]


def fingerprint(summary: dict[str, Any], out: Path) -> str:
    """sha256 over every weight, the training losses and the eval log (without wall-clock times)."""
    h = hashlib.sha256()
    model = summary["model"]
    for name, value in sorted(model.state_dict().items()):
        value = value.full_tensor() if hasattr(value, "full_tensor") else value
        h.update(name.removeprefix("module.").encode())
        h.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(summary["train_losses"]).encode())
    for line in (out / "eval.jsonl").read_text().splitlines():
        record = json.loads(line)
        record.pop("time", None)
        h.update(json.dumps(record, sort_keys=True).encode())
    return h.hexdigest()


def _run(out: Path, *extra: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:  # (the "removed temporaries" notes of resumed runs are expected here)
        with contextlib.redirect_stderr(io.StringIO()):
            return run(parse_args([*TINY, "--out-dir", str(out), *extra]))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _main_quiet(argv: list[str]) -> tuple[int, list[str]]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, [line for line in err.getvalue().splitlines() if line.strip()]


class Trial:
    def __init__(self, work: Path):
        self.work = work
        self.rows: list[tuple[str, int, int, str]] = []
        ref = work / "reference"
        self.reference = fingerprint(_run(ref), ref)
        self.writes = ckpt.write_log()

    def add(self, fault: str, tried: int, survived: int, how: str) -> None:
        self.rows.append((fault, tried, survived, how))
        print(f"  {fault}: {survived}/{tried}", file=sys.stderr, flush=True)

    def resume_matches(self, out: Path) -> bool:
        try:
            summary = _run(out, "--resume")
        except ckpt.NoCheckpointError:  # killed before the first checkpoint: start over
            summary = _run(out, "--overwrite")
        clean = not ckpt.CheckpointStore(out).temporaries()
        return clean and fingerprint(summary, out) == self.reference

    # ------------------------------------------------------------ kills
    def kill_before_every_write(self) -> None:
        ok = 0
        for k in range(1, len(self.writes) + 1):
            out = self.work / f"raise{k}"
            try:
                _run(out, env={"LRGRAD_FAULT_AT_WRITE": str(k), "LRGRAD_FAULT_MODE": "raise"})
            except ckpt.SimulatedCrash:
                ok += self.resume_matches(out)
        self.add("kill before each durable write (1 process)", len(self.writes), ok,
                 f"every one of the {len(self.writes)} writes of a run (log, run.json, step folder, state.pt, "
                 "manifest, rename, prune); resumed bit-identically")

    def real_kills(self, n: int, rng: random.Random) -> None:
        ok = 0
        for i in range(n):
            k = rng.randint(1, len(self.writes))
            out = self.work / f"exit{i}"
            env = dict(os.environ, LRGRAD_FAULT_AT_WRITE=str(k), LRGRAD_FAULT_MODE="exit")
            proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--out-dir", str(out)], cwd=ROOT, env=env,
                                  capture_output=True, timeout=600)
            if proc.returncode != 137:  # not killed where asked: show why
                print(f"  write {k}: exit code {proc.returncode}\n{proc.stderr.decode()[-2000:]}", file=sys.stderr)
                continue
            ok += self.resume_matches(out)
        self.add("os._exit (like SIGKILL) at a random write (1 process)", n, ok,
                 "a real process death mid-checkpoint, then --resume")

    def sigterm_every_step(self) -> None:
        ok = 0
        for stop in (1, 2, 3):
            out = self.work / f"term{stop}"

            def on_step(step: int, stop: int = stop) -> None:
                if step == stop:
                    os.kill(os.getpid(), signal.SIGTERM)

            with contextlib.redirect_stderr(io.StringIO()):
                run(parse_args([*TINY, "--out-dir", str(out)]), on_step=on_step)
            ok += self.resume_matches(out)
        self.add("SIGTERM after each step", 3, ok, "checkpoint on the signal, resume command printed, resumed")

    def parallel_images(self) -> None:
        """--parallel ddp/fsdp2 under torchrun: a crash image at every write of rank 0, each resumed."""
        for mode in ("ddp", "fsdp2"):
            snaps = self.work / f"snap-{mode}"
            ref = self.work / f"pref-{mode}"
            env = dict(os.environ, LRGRAD_FAULT_MODE="snapshot", LRGRAD_FAULT_SNAPSHOTS=str(snaps))
            worker = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                      str(Path(__file__).resolve()), "--worker", mode]
            subprocess.run([*worker, str(ref)], cwd=ROOT, env=env, check=True, capture_output=True, timeout=900)
            images = sorted(snaps.iterdir())
            result = self.work / f"presult-{mode}.json"
            subprocess.run([*worker, str(ref), *map(str, images), "--result", str(result)], cwd=ROOT, check=True,
                           capture_output=True, timeout=1800)
            prints = json.loads(result.read_text())
            want = prints[str(ref)]
            ok = sum(prints[str(p)] in (want, "no checkpoint yet") for p in images)
            self.add(f"kill at each write of rank 0, 2-process {mode.upper()}", len(images), ok,
                     "DCP shards + state.pt in one step folder published by one rename; resumed bit-identically")

    # ------------------------------------------------------------ damage
    def bit_flips(self, n: int, rng: random.Random) -> None:
        src = self.work / "reference"
        folder = src / "checkpoints" / "step-00000004"
        state = folder / "state.pt"
        size = state.stat().st_size
        ok = 0
        for _ in range(n):
            out = self.work / "flip"
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(src, out)
            target = out / "checkpoints" / "step-00000004" / "state.pt"
            data = bytearray(target.read_bytes())
            data[rng.randrange(size)] ^= 1 << rng.randrange(8)
            target.write_bytes(bytes(data))
            code, err = _main_quiet([*TINY, "--out-dir", str(out), "--resume"])
            ok += code == 2 and len(err) == 1 and str(target) in err[0] and "sha256 mismatch" in err[0]
        self.add("single-bit flip in state.pt", n, ok, "refused (exit 2, one line naming the file); "
                 "with an older checkpoint kept, --resume falls back to it and says which")

    def dcp_flips(self, n: int, rng: random.Random) -> None:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Linear(16, 8))
        opt = torch.optim.AdamW(model.parameters())
        model(torch.randn(4, 32)).sum().backward()
        opt.step()
        ok = 0
        with contextlib.redirect_stderr(io.StringIO()), _no_warnings():
            path = self.work / "dcp"
            save_checkpoint(path, model, opt)
            files = sorted(p for p in path.iterdir() if p.name != "lrgrad_manifest.json")
            for _ in range(n):
                target = rng.choice(files)
                original = target.read_bytes()
                data = bytearray(original)
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
                target.write_bytes(bytes(data))
                try:
                    load_checkpoint(path, model, opt)
                except CheckpointError as exc:
                    ok += exc.path == str(target)
                target.write_bytes(original)
        self.add("single-bit flip in a DCP file (shards, .metadata)", n, ok,
                 "lrgrad.distributed.load_checkpoint refuses before dcp.load unpickles .metadata")

    def refusals(self) -> None:
        cases = {
            "empty state.pt": lambda f: (f / "state.pt").write_bytes(b""),
            "truncated state.pt": lambda f: (f / "state.pt").write_bytes((f / "state.pt").read_bytes()[:-100]),
            "garbage state.pt (manifest rewritten)": lambda f: ((f / "state.pt").write_bytes(b"D" * 999),
                                                                 write_manifest(f)),
            "empty state.pt (manifest rewritten)": lambda f: ((f / "state.pt").write_bytes(b""), write_manifest(f)),
            "manifest deleted": lambda f: (f / "lrgrad_manifest.json").unlink(),
            "file planted in the folder": lambda f: (f / "x.pt").write_bytes(b"x"),
        }
        ok = 0
        for fn in cases.values():
            out = self.work / "refuse"
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(self.work / "reference", out)
            fn(out / "checkpoints" / "step-00000004")
            code, err = _main_quiet([*TINY, "--out-dir", str(out), "--resume"])
            ok += code == 2 and len(err) == 1 and str(out / "checkpoints" / "step-00000004") in err[0]
        self.add("damaged checkpoint files", len(cases), ok, "; ".join(cases) + ": exit 2, one line naming the file")

    def changed_arguments(self) -> None:
        cases = [["--layerwise"], ["--batch-size", "2"], ["--seq-len", "16"], ["--update-proj-gap", "3"],
                 ["--rank", "4"]]
        ok = 0
        for extra in cases:
            out = self.work / "changed"
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(self.work / "reference", out)
            code, err = _main_quiet([*TINY, "--out-dir", str(out), "--resume", *extra])
            ok += code == 2 and len(err) == 1 and extra[0] in err[0] and "state.pt" in err[0]
        self.add("resume with a changed meaning (--layerwise, --batch-size, --seq-len, --update-proj-gap, --rank)",
                 len(cases), ok, "refused in one line naming state.pt and the argument (--lr, --max-steps: honoured "
                 "and recorded in run.json)")

    def leftovers(self) -> None:
        """What kills left behind: temporaries removed on start, no duplicate eval records."""
        dirs = [p for p in self.work.iterdir() if p.name.startswith(("raise", "exit", "term"))]
        ok = 0
        for d in dirs:
            steps = [json.loads(line)["step"] for line in (d / "eval.jsonl").read_text().splitlines()]
            ok += not ckpt.CheckpointStore(d).temporaries() and len(steps) == len(set(steps))
        self.add("leftovers after each kill and resume (temporaries, duplicate eval.jsonl records)", len(dirs), ok,
                 "stale temporaries removed on start; the log truncated to the checkpoint's step on resume")


@contextlib.contextmanager
def _no_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def worker(mode: str, dirs: list[str], result: str | None) -> None:
    """Under torchrun: run (or resume) each folder with --parallel ``mode``; rank 0 writes fingerprints."""
    prints = {}
    for d in dirs:
        out = Path(d)
        try:
            summary = run(parse_args([*TINY, "--out-dir", d, "--parallel", mode,
                                      *(["--resume"] if result else [])]))
        except ckpt.NoCheckpointError:
            prints[d] = "no checkpoint yet"
            continue
        prints[d] = fingerprint(summary, out)
    if result and int(os.environ.get("RANK", "0")) == 0:
        Path(result).write_text(json.dumps(prints))


def main_trial(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--real-kills", type=int, default=2, help="subprocess runs killed with os._exit (default: 2)")
    p.add_argument("--flips", type=int, default=30, help="bit flips per file kind (default: 30)")
    p.add_argument("--parallel", action="store_true", help="also DDP and FSDP2 under torchrun (default: off)")
    p.add_argument("--seed", type=int, default=0, help="which writes and bits (default: 0)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("dirs", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.worker:
        worker(opts.worker, opts.dirs, opts.result)
        return 0
    torch.set_num_threads(1)
    rng = random.Random(opts.seed)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        trial = Trial(Path(tmp))
        trial.kill_before_every_write()
        trial.real_kills(opts.real_kills, rng)
        trial.sigterm_every_step()
        if opts.parallel:
            trial.parallel_images()
        trial.leftovers()
        trial.bit_flips(opts.flips, rng)
        trial.dcp_flips(opts.flips, rng)
        trial.refusals()
        trial.changed_arguments()
    print(f"`python experiments/tools/fault_trial.py{' --parallel' if opts.parallel else ''}` — llama_test, 4 steps, "
          f"checkpoint every 2, keep 1; seed {opts.seed}; torch {torch.__version__}; {time.time() - t0:.0f} s\n")
    print("| fault | tried | survived | how |")
    print("|---|---|---|---|")
    for fault, tried, survived, how in trial.rows:
        print(f"| {fault} | {tried} | {survived} | {how} |")
    return 0 if all(t == s for _, t, s, _ in trial.rows) else 1


if __name__ == "__main__":
    sys.exit(main_trial())
