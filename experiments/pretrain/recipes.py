"""The papers' C4 pretraining protocol and the numbers they report, with where each value comes from.

Protocol (GaLore's ``scripts/benchmark_c4/llama_*.sh`` and ``torchrun_main.py``, arXiv:2403.03507; Fira's
``pre_training_c4/scripts`` use the same one): LLaMA 60M/130M/350M/1B on C4 ``en``, T5 tokenizer, sequence
256, global batch 512, 10K/20K/60K/100K steps, warmup 10% of the steps then cosine to 10% of the peak, no
weight decay, no gradient clipping (``--grad_clipping`` defaults to 0 there), refresh gap 200, bf16,
evaluation on 10M C4 validation tokens every 1000 steps.

Every number carries its source. ``verified=True`` only for what was read in the authors' own files
(the scripts' hyperparameters); the perplexities could not be opened here (the papers' PDFs were not
reachable) and are marked unverified: check them against the table named before citing a gap.
"""

from __future__ import annotations

from dataclasses import dataclass

#: size -> (config name, steps) of the protocol
SIZES: dict[str, tuple[str, int]] = {
    "60m": ("llama_60m", 10_000),
    "130m": ("llama_130m", 20_000),
    "350m": ("llama_350m", 60_000),
    "1b": ("llama_1b", 100_000),
}
GLOBAL_BATCH = 512
SEQ_LEN = 256
WARMUP_RATIO = 0.1
MIN_LR_RATIO = 0.1
GRAD_CLIP = 0.0
UPDATE_PROJ_GAP = 200
EVAL_TOKENS = 10_000_000
EVAL_EVERY = 1000
TOKENIZER = "t5-base"
#: per-GPU micro-batch of GaLore's scripts (60M/130M on 1 GPU, 350M on 4, 1B on 8; all accumulate to 512)
MICRO_BATCH = {"60m": 256, "130m": 256, "350m": 128, "1b": 16}

GALORE_SCRIPTS = "github.com/jiaweizzhao/GaLore scripts/benchmark_c4/llama_<size>.sh"
FIRA_SCRIPTS = "github.com/xichen-fy/Fira pre_training_c4/scripts/llama_<size>.sh"


@dataclass(frozen=True)
class Recipe:
    """One method's hyperparameters in one paper's protocol, per size."""

    lr: float
    rank: dict[str, int] | None  # per size; None: unprojected (AdamW) or the method's own (APOLLO-Mini: 1)
    scale: dict[str, float] | None
    source: str
    verified: bool


@dataclass(frozen=True)
class PaperNumber:
    """A perplexity a paper reports for (method, size)."""

    ppl: float
    source: str
    verified: bool


_GALORE_RANK = {"60m": 128, "130m": 256, "350m": 256, "1b": 1024}  # the 1B script says 1024; Table 2 lists 512
_FIRA_RANK = {"60m": 128, "130m": 256, "350m": 256, "1b": 512}
_QUARTER = {s: 0.25 for s in SIZES}

RECIPES: dict[tuple[str, str], Recipe] = {
    ("galore", "galore_adamw"): Recipe(0.01, _GALORE_RANK, _QUARTER, GALORE_SCRIPTS + " (lr 0.01, galore_scale 0.25, "
                                       "rank 128/256/256/1024, gap 200)", True),
    ("galore", "adamw"): Recipe(0.001, None, None, "GaLore's full-rank baseline: lr not in its scripts; 0.001 is "
                                "the value lrgrad's docs attribute to the 60M baseline", False),
    ("fira", "fira_adamw"): Recipe(0.01, _FIRA_RANK, {**_QUARTER, "1b": 0.0625}, FIRA_SCRIPTS + " (lr 0.01, alpha "
                                   "0.25 (1B: 0.0625), rank 128/256/256/512, gap 200)", True),
    ("fira", "galore_adamw"): Recipe(0.01, _FIRA_RANK, _QUARTER, "Fira's GaLore baseline: assumed GaLore's recipe at "
                                     "Fira's ranks", False),
    ("fira", "adamw"): Recipe(0.001, None, None, "as GaLore's baseline (unverified)", False),
    ("apollo", "apollo_adamw"): Recipe(0.01, _FIRA_RANK, None, "APOLLO's scripts are not in the public index used "
                                       "here: lrgrad's APOLLO preset (scale 1) at GaLore's table ranks", False),
    ("apollo", "apollo_mini_adamw"): Recipe(0.01, None, None, "lrgrad's APOLLO-Mini preset (rank 1, scale sqrt(128)); "
                                            "APOLLO's scripts not read", False),
    ("apollo", "galore_adamw"): Recipe(0.01, _FIRA_RANK, _QUARTER, "GaLore's recipe at the table ranks (unverified)",
                                       False),
    ("apollo", "fira_adamw"): Recipe(0.01, _FIRA_RANK, _QUARTER, "Fira's recipe (unverified for APOLLO's table)",
                                     False),
    ("apollo", "adamw"): Recipe(0.001, None, None, "as GaLore's baseline (unverified)", False),
}

_GALORE_T2 = "GaLore arXiv:2403.03507 Table 2 (as quoted in issue 34; PDF not opened here)"
_APOLLO_T = "APOLLO arXiv:2412.05270, pretraining table (recalled, not opened here: check before citing)"
_FIRA_T = "Fira arXiv:2410.01623, pretraining table (recalled, not opened here: check before citing)"


def _row(values: tuple[float, float, float, float], source: str) -> dict[str, PaperNumber]:
    return {size: PaperNumber(v, source, False) for size, v in zip(SIZES, values)}


#: (paper, method) -> size -> the perplexity the paper reports
PAPER_PPL: dict[tuple[str, str], dict[str, PaperNumber]] = {
    ("galore", "adamw"): _row((34.06, 25.08, 18.80, 15.56), _GALORE_T2),
    ("galore", "galore_adamw"): _row((34.88, 25.36, 18.95, 15.64), _GALORE_T2),
    ("apollo", "adamw"): _row((34.06, 25.08, 18.80, 15.56), _APOLLO_T + "; AdamW as GaLore's"),
    ("apollo", "galore_adamw"): _row((34.88, 25.36, 18.95, 15.64), _APOLLO_T + "; GaLore as GaLore's"),
    ("apollo", "fira_adamw"): _row((31.06, 22.73, 17.03, 14.31), _APOLLO_T),
    ("apollo", "apollo_adamw"): _row((31.55, 22.94, 16.85, 14.20), _APOLLO_T),
    ("apollo", "apollo_mini_adamw"): _row((31.93, 23.84, 17.18, 14.17), _APOLLO_T),
    ("fira", "adamw"): _row((34.06, 25.08, 18.80, 15.56), _FIRA_T + "; AdamW as GaLore's"),
    ("fira", "galore_adamw"): _row((34.88, 25.36, 18.95, 15.64), _FIRA_T + "; GaLore as GaLore's"),
    ("fira", "fira_adamw"): _row((31.06, 22.73, 17.03, 14.31), _FIRA_T),
}

#: how lrgrad's pipeline differs from the authors' scripts, whatever the row (printed with every table)
KNOWN_DIFFERENCES = (
    "documents are packed into 257-token windows (the authors' loader truncates each document to 256 tokens "
    "and pads, and their loss skips the padding)",
    "fp32 weights under bf16 autocast (the authors cast the model to bf16)",
    "C4's train stream is shuffled with the run's seed in a 10,000-document buffer (the authors: seed 42); "
    "validation is the first 10M tokens of C4's validation split, not a seed-42 shuffle of it",
)


def papers() -> list[str]:
    return sorted({p for p, _ in RECIPES})


def methods(paper: str) -> list[str]:
    return [m for p, m in RECIPES if p == paper]


def get_recipe(paper: str, method: str) -> Recipe:
    if paper not in papers():
        raise ValueError(f"Invalid paper: {paper!r}; choose one of {', '.join(papers())}")
    if (paper, method) not in RECIPES:
        raise ValueError(f"Invalid method for paper {paper!r}: {method!r}; choose one of {', '.join(methods(paper))}")
    return RECIPES[(paper, method)]
