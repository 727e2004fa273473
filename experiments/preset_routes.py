"""Every preset on every route: what a user gets, written to ``docs/presets.md``.

    python experiments/preset_routes.py            # writes docs/presets.md
    python experiments/preset_routes.py --check    # exit 1 when docs/presets.md is not current

Each row of the preset table (``lrgrad.optim.presets.PRESETS``) is built five ways on the same tiny
LLaMA (``transformers.LlamaForCausalLM`` from a config: hidden 32, 2 layers, vocab 64; no download),
with only the preset's own defaults (``rank=8`` only for a projected preset that has no default rank):

* ``direct``: ``Cls(model.parameters(), rank=r)`` - no names, so every matrix is projected (the
  embeddings and the head too: the one documented difference, README "Which params are projected");
* ``param_groups``: ``Cls(lrgrad.param_groups(model, rank=r))``;
* ``named``: ``Cls(model.named_parameters(), rank=r)``;
* ``Trainer``: ``lrgrad.integrations.transformers.create_optimizer(model, args, optimizer=<class name>, rank=r)``;
* ``estimator``: the optimizer ``lrgrad.estimate_memory(model, optimizer=<class name>)`` models
  (``lrgrad.estimate.make_optimizer``, its default route ``named_parameters``).

Columns: the projected group's ``rank``, ``scale`` (``None``: the projector's RMS-matched default),
``update_proj_gap``, ``rule``, ``full_rank``, ``projector``, and how many params each route projects.
A field shows one value when all five routes agree; otherwise each route's value.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

import lrgrad
from lrgrad.estimate import make_optimizer
from lrgrad.optim.presets import PRESETS, resolve

ROUTES = ("direct", "param_groups", "named", "Trainer", "estimator")
FIELDS = ("rank", "scale", "update_proj_gap", "rule", "full_rank", "projector")
#: the rank given to a projected preset that has no default rank of its own
RANK = 8
OUT = Path(__file__).resolve().parents[1] / "docs" / "presets.md"


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def trainer_args(out: str, **overrides: Any) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(out, report_to="none", use_cpu=True, learning_rate=1e-3, **overrides)


def build(route: str, name: str, rank: int | None, out: str) -> torch.optim.Optimizer:
    """Preset ``name`` on ``route`` with its own defaults (``rank`` only when it has none)."""
    model = tiny_llama()
    cls = lrgrad.OPTIMIZERS[name]
    given = {} if rank is None else {"rank": rank}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # model.parameters() with a rank warns, by design
        if route == "direct":
            return cls(model.parameters(), **given)
        if route == "param_groups":
            return cls(lrgrad.param_groups(model, rank=rank if rank is not None else cls.preset.defaults["rank"]))
        if route == "named":
            return cls(model.named_parameters(), **given)
        if route == "Trainer":
            from lrgrad.integrations.transformers import create_optimizer

            return create_optimizer(model, trainer_args(out), optimizer=name, **given)
        return make_optimizer(model, name, rank=rank)


def describe(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The projected group's fields (the first group with a rank, else the first) and the projected count."""
    group = next((g for g in opt.param_groups if g["rank"] is not None), opt.param_groups[0])
    out = {key: group[key] for key in FIELDS}
    out["projected"] = sum(opt.is_projected(p, g) for g in opt.param_groups for p in g["params"])
    return out


def rows() -> list[dict[str, Any]]:
    """One entry per preset: its composition and each route's ``describe``."""
    table = []
    with tempfile.TemporaryDirectory() as out:
        for row in PRESETS:
            preset = resolve(row)
            rank = RANK if preset.defaults["rank"] is None and not preset.matrix_only else None
            routes = {route: describe(build(route, row.name, rank, out)) for route in ROUTES}
            table.append({"name": row.name, "aliases": row.aliases, "given": rank, "routes": routes})
    return table


def hf_rows() -> list[dict[str, Any]]:
    """transformers' own ``optim`` names, with nothing in ``optim_args``: transformers' defaults."""
    from lrgrad.integrations.transformers import HF_OPTIM_NAMES, create_optimizer

    out = []
    with tempfile.TemporaryDirectory() as folder:
        for optim, name in HF_OPTIM_NAMES.items():
            opt = create_optimizer(tiny_llama(), trainer_args(folder, optim=optim))
            out.append({"optim": optim, "name": name, **describe(opt)})
    return out


def fmt(value: Any, key: str = "") -> str:
    if isinstance(value, float):
        return "√128" if math.isclose(value, math.sqrt(128)) else f"{value:g}"
    if value is None:
        return {"scale": "default", "rank": "none"}.get(key, "—")
    return str(value)


def cell(routes: dict[str, dict[str, Any]], key: str) -> str:
    values = {route: routes[route][key] for route in ROUTES}
    if len({repr(v) for v in values.values()}) == 1:
        return fmt(values[ROUTES[0]], key)
    return "; ".join(f"{route}: {fmt(value, key)}" for route, value in values.items())


def disagreements(entry: dict[str, Any]) -> list[str]:
    """The fields on which a route differs from ``param_groups``, less the documented difference (``direct``
    projects the embeddings and the head too: more params, never fewer)."""
    routes, reference = entry["routes"], entry["routes"]["param_groups"]
    out = [f"{route}.{key}" for route in ROUTES for key in FIELDS if routes[route][key] != reference[key]]
    out += [f"{route}.projected" for route in ROUTES if route != "direct"
            and routes[route]["projected"] != reference["projected"]]
    if routes["direct"]["projected"] < reference["projected"]:
        out.append("direct.projected")
    return out


def render(table: list[dict[str, Any]], hf: list[dict[str, Any]]) -> str:
    lines = [
        "# Presets on every route",
        "",
        "Written by `python experiments/preset_routes.py` (`tests/experiments/test_preset_routes.py` fails when "
        "this page is not current). Each preset of `lrgrad.optim.presets.PRESETS` is built on a tiny LLaMA "
        "(hidden 32, 2 layers, vocab 64: 14 block matrices + the embedding and the head) with its own "
        f"defaults - `rank={RANK}` given only to projected presets without a default rank (column *given*) - on "
        "five routes: `direct` = `Cls(model.parameters(), ...)`, `param_groups` = "
        "`Cls(lrgrad.param_groups(model, rank=r))`, `named` = `Cls(model.named_parameters(), ...)`, `Trainer` = "
        "`lrgrad.integrations.transformers.create_optimizer(model, args, optimizer=<class name>, ...)`, `estimator` = "
        "what `lrgrad.estimate_memory(model, optimizer=<class name>)` models. A field shows one value when the five "
        "routes agree. `scale` *default*: the projector's RMS-matched √(d/r) (1 for Gaussian draws).",
        "",
        "Documented difference: `direct` has no names, so it also projects the embedding and the head (16 "
        "instead of 14 params at rank 8; README, \"Which params are projected\"). Every other field is the "
        "same on all five routes.",
        "",
        "| preset | aliases | given | rank | scale | gap | rule | full_rank | projector | projected: "
        + " / ".join(ROUTES) + " |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in table:
        routes = entry["routes"]
        projected = " / ".join(str(routes[r]["projected"]) for r in ROUTES)
        aliases = ", ".join(f"`{a}`" for a in entry["aliases"]) or "—"
        lines.append(f"| `{entry['name']}` | {aliases} | {fmt(entry['given'])} | "
                     + " | ".join(cell(routes, key) for key in FIELDS) + f" | {projected} |")
    lines += [
        "",
        "## transformers' own `optim` names",
        "",
        "`TrainingArguments(optim=<name>)` with nothing in `optim_args` gets what transformers' own path fills in "
        "(`lrgrad.integrations.transformers.HF_DEFAULTS`, pinned against the installed transformers' "
        "`trainer_optimizer.py`): the one place another library's defaults replace a preset's. Any other `optim` "
        "is refused unless `optimizer=` names an lrgrad optimizer, which then keeps its own defaults (above).",
        "",
        "| optim | class | rank | scale | gap | projector | projected |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in hf:
        lines.append(f"| `{entry['optim']}` | `{entry['name']}` | {fmt(entry['rank'])} | "
                     f"{fmt(entry['scale'], 'scale')} | {fmt(entry['update_proj_gap'])} | {entry['projector']} | "
                     f"{entry['projected']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/presets.md is not current")
    args = parser.parse_args(argv)
    text = render(rows(), hf_rows())
    if args.check:
        current = OUT.exists() and OUT.read_text() == text
        print("docs/presets.md is current" if current else "docs/presets.md is stale: run experiments/preset_routes.py")
        return 0 if current else 1
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
