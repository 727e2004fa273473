"""The 60M row of the papers' protocol on one GPU, AdamW and GaLore side by side, in a fixed time.

    make gpu-check && python experiments/tools/gpu_rows.py --minutes 8

Each method runs ``experiments/reproduce.py --paper galore --size 60m`` (the 10,000-step schedule, global
batch 512 as 2 x 256, bf16): a 20-step chunk measures the step time, then a second chunk takes as many steps
as the method's share of ``--minutes`` allows. The rows are partial and say so; ``results/reproduce.md``
records their perplexity at the last evaluation, tokens/s and peak memory (``torch.cuda.max_memory_allocated``).

Data: C4 with the t5-base tokenizer when the Hugging Face hub answers and ``datasets`` is installed.
Otherwise (a lent box with no network)
the embedded corpus (the Python standard library's sources) with a 32,100-token BPE tokenizer trained here on
it — the 60M model's real shapes and vocabulary size, so tokens/s and memory are the row's, but the loss is
not C4's, and it is evaluated on 196,608 tokens (what the sources' validation files hold): the row names the
deviations and claims no gap. ``--eval-every`` 200 (also named) gives loss points within minutes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from lrgrad_experiments import reproduce
from lrgrad_experiments.paths import REPO
from lrgrad_experiments.pretrain.data import stdlib_root

METHODS = ("adamw", "galore_adamw")
CALIBRATION_STEPS = 20


def hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def stdlib_sources() -> list[Path]:
    return sorted(p for p in stdlib_root().rglob("*.py") if "site-packages" not in p.parts and p.is_file())


def offline_tokenizer(out: Path, vocab_size: int = 32100) -> Path:
    """A byte-level BPE tokenizer of ``vocab_size`` trained on the standard library's ``.py`` files."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    files = stdlib_sources()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    texts = (Path(f).read_text(encoding="utf-8", errors="replace") for f in files)  # a few are not UTF-8
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size,
                                                       special_tokens=["<pad>", "</s>", "<unk>"]))
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=8.0, help="for all methods together (default: %(default)s)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help="(default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=200, help="(default: %(default)s)")
    p.add_argument("--out-root", default=str(REPO / "runs" / "gpu_rows"), help="(default: %(default)s)")
    opts = p.parse_args(argv)
    start = time.time()
    common = ["--paper", "galore", "--size", "60m", "--eval-every", str(opts.eval_every), "--out-root", opts.out_root]
    has_datasets = importlib.util.find_spec("datasets") is not None  # not a dependency: `pip install datasets`
    if has_datasets and hub_reachable():
        print("gpu_rows: C4 + t5-base from the Hugging Face hub", flush=True)
    else:
        folder = Path(tempfile.mkdtemp(prefix="gpu_rows_tokenizer_"))
        why = "no Hugging Face hub" if has_datasets else "no `datasets` package"
        print(f"gpu_rows: {why}; training a 32,100-token BPE tokenizer on {stdlib_root()}", flush=True)
        corpus = folder / "stdlib_py"  # the sources only (the stdlib folder also holds binaries)
        for f in stdlib_sources():
            target = corpus / f.relative_to(stdlib_root())
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
        # the sources' validation files hold ~0.3M tokens: three evaluation batches of 256 x 256, not 10M tokens
        common += ["--data", str(corpus), "--tokenizer", str(offline_tokenizer(folder / "tokenizer")),
                   "--eval-tokens", str(3 * 256 * 256)]
    share = (60 * opts.minutes - (time.time() - start)) / len(opts.methods)
    for method in opts.methods:
        t0 = time.time()
        argv_row = [*common, "--method", method]
        if reproduce.main([*argv_row, "--stop-after", str(CALIBRATION_STEPS)]) != 0:
            return 1
        rows = sorted(Path(opts.out_root).glob(f"galore-{method}-60m-*/row.json"), key=lambda f: f.stat().st_mtime)
        step_s = json.loads(rows[-1].read_text())["run"]["step_time_s"]
        left = share - (time.time() - t0)
        steps = int(0.9 * left / step_s) if step_s else 0  # 10% for evaluations and the checkpoint
        print(f"gpu_rows: {method}: {step_s:.3f} s/step; {steps} more steps in {left:.0f} s", flush=True)
        if steps > 0 and reproduce.main([*argv_row, "--stop-after", str(steps)]) != 0:
            return 1
    print(f"gpu_rows: done in {(time.time() - start) / 60:.1f} min; see results/reproduce.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
