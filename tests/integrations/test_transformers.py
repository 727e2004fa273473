"""lrgrad.integrations.transformers: the lrgrad optimizer from TrainingArguments, in the Trainer.

Single process, tiny LLaMA from a config (no hub), a few steps. The claim users need most:
``resume_from_checkpoint`` continues bit-identically (across a subspace refresh).
"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from hf_tiny import GAP, RANK, TokenDataset, reset_accelerate, tiny_llama, tiny_mixtral, weights

import lrgrad
from lrgrad.integrations.transformers import (
    create_optimizer,
    create_optimizer_and_scheduler,
    optimizer_cls_and_kwargs,
    parse_optim_args,
)

STEPS = 6
SAVE_AT = 3
TARGETS = ["self_attn", "mlp"]


def make_args(out, **overrides):
    from transformers import TrainingArguments

    options = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
                   weight_decay=0.1, lr_scheduler_type="cosine", warmup_steps=1, save_strategy="steps",
                   save_steps=SAVE_AT, logging_steps=100, report_to="none", use_cpu=True, seed=0,
                   disable_tqdm=True, dataloader_num_workers=0, optim="galore_adamw",
                   optim_target_modules=TARGETS,
                   optim_args=f"rank={RANK}, update_proj_gap={GAP}, scale=0.5, proj_type=std")
    options.update(overrides)
    return TrainingArguments(**options)


def test_import_lrgrad_does_not_import_transformers_or_accelerate(tmp_path):
    code = ("import sys, lrgrad, lrgrad.integrations, lrgrad.integrations.transformers; "
            "print(sorted(m for m in ('transformers', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_parse_optim_args_types_values():
    assert parse_optim_args("rank=64, update_proj_gap=100, scale=0.25, proj_type=reverse_std") == {
        "rank": 64, "update_proj_gap": 100, "scale": 0.25, "proj_type": "reverse_std"}
    assert parse_optim_args(None) == {} and parse_optim_args("  ") == {}
    with pytest.raises(ValueError, match="optim_args.*'rank64'"):
        parse_optim_args("rank64")


def test_args_become_the_galore_optimizer(tmp_path):
    model = tiny_llama()
    opt = create_optimizer(model, make_args(tmp_path, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7))
    assert type(opt) is lrgrad.GaLoreAdamW
    # independent oracle: the attention/MLP nn.Linear weights by name
    want = {f"{n}.weight" for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and (".self_attn." in n or ".mlp." in n)}
    low = opt.param_groups[0]
    assert set(low["param_names"]) == want and len(want) == 14
    assert (low["rank"], low["update_proj_gap"], low["scale"], low["proj_type"]) == (RANK, GAP, 0.5, "std")
    for group in opt.param_groups:
        assert group["lr"] == 1e-2 and group["betas"] == (0.8, 0.95) and group["eps"] == 1e-7
        # the Trainer's decay rule: matrices decay, 1-D params (norms) do not
        dims = {p.dim() for p in group["params"]}
        assert group["weight_decay"] == (0.0 if dims == {1} else 0.1)
    assert {n for g in opt.param_groups[1:] for n in g["param_names"]} == {
        n for n, _ in model.named_parameters()} - want


def test_trainer_groups_refresh_as_galore_torch_unless_optim_args_say(tmp_path):
    """The groups carry galore-torch's four keys, so they take its exact SVD; svd=warm (lrgrad's
    default) or svd=gram in optim_args, or as a keyword, chooses otherwise."""
    model = tiny_llama()
    assert create_optimizer(model, make_args(tmp_path)).param_groups[0]["svd"] == "exact"
    args = make_args(tmp_path, optim_args=f"rank={RANK}, update_proj_gap={GAP}, svd=gram")
    assert create_optimizer(model, args).param_groups[0]["svd"] == "gram"
    assert create_optimizer(model, make_args(tmp_path), svd="gram").param_groups[0]["svd"] == "gram"
    args = make_args(tmp_path, optim_args=f"rank={RANK}, update_proj_gap={GAP}, svd=warm")
    assert create_optimizer(model, args).param_groups[0]["svd"] == "warm"


def test_optim_names_and_overrides(tmp_path):
    model = tiny_llama()
    opt = create_optimizer(model, make_args(tmp_path, optim="galore_adafactor"), rank=4)
    assert type(opt) is lrgrad.GaLoreAdafactor and opt.param_groups[0]["rank"] == 4
    assert "betas" not in opt.defaults  # Adam's betas/eps are not Adafactor's
    cls, kwargs = optimizer_cls_and_kwargs(model, make_args(tmp_path, optim="adamw_torch"), optimizer="dct", lr=3e-3)
    assert cls is lrgrad.DCTAdamW and kwargs["lr"] == 3e-3 and kwargs["params"][0]["rank"] == RANK


def test_refusals_name_the_argument(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match="deepspeed.*flattens"):
        create_optimizer(model, SimpleNamespace(deepspeed="ds_config.json", learning_rate=1e-3))
    with pytest.raises(ValueError, match="optim.*galore_adamw_layerwise.*LayerwiseOptimizer"):
        create_optimizer(model, make_args(tmp_path, optim="galore_adamw_layerwise"))
    with pytest.raises(ValueError, match="num_training_steps"):
        create_optimizer_and_scheduler(model, make_args(tmp_path, max_steps=-1, num_train_epochs=1))
    with pytest.raises(TypeError, match="optimizer"):
        create_optimizer(model, make_args(tmp_path), optimizer=torch.optim.SGD)


def run_trainer(args, route: str, resume: str | None = None, build=tiny_llama):
    from transformers import Trainer

    reset_accelerate()
    model = build()
    if route == "optimizer_cls_and_kwargs":
        trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(),
                          optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(model, args))
    else:
        trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(),
                          optimizers=create_optimizer_and_scheduler(model, args))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.parametrize("route", ["optimizer_cls_and_kwargs", "optimizers"])
def test_trainer_resume_from_checkpoint_is_bit_identical(tmp_path, route):
    start = weights(tiny_llama())
    args = make_args(tmp_path)
    full = run_trainer(args, route)
    opt = full.optimizer.optimizer  # Accelerate's wrapper around the lrgrad optimizer
    assert type(opt) is lrgrad.GaLoreAdamW
    projected = [s for s in opt.state.values() if "proj_basis" in s]
    assert len(projected) == 14 and all(s["step"] == STEPS for s in projected)
    assert full.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # cosine ran to its end
    want = weights(full.model)
    assert any(not torch.equal(want[k], start[k]) for k in want)

    resumed = run_trainer(args, route, resume=str(tmp_path / f"checkpoint-{SAVE_AT}"))
    got = weights(resumed.model)
    assert resumed.state.global_step == STEPS
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_trainer_projects_moe_experts_and_its_checkpoint_loads(tmp_path):
    """A tiny Mixtral: optim_target_modules ["self_attn", "mlp"] takes the fused expert stacks (their module
    is under mlp), each expert projected as its own matrix; the Trainer's optimizer.pt loads into a fresh
    optimizer with every expert's state. (Not compared end to end: transformers 5.25's resume_from_checkpoint
    drops a Mixtral's experts and router - its checkpoint holds them as block_sparse_moe.experts.N.w1 -
    under torch.optim.AdamW too.)"""
    args = make_args(tmp_path)
    full = run_trainer(args, "optimizers", build=tiny_mixtral)
    opt = full.optimizer.optimizer
    stacks = [g for g in opt.param_groups if g["experts"]]
    assert len(stacks) == 1 and len(stacks[0]["params"]) == 4
    experts = [s for p in stacks[0]["params"] for s in opt.state[p]["experts"]]
    assert len(experts) == 16 and all("proj_basis" in s and s["step"] == STEPS for s in experts)
    saved = torch.load(tmp_path / f"checkpoint-{SAVE_AT}" / "optimizer.pt", weights_only=True)
    fresh = create_optimizer(tiny_mixtral(), args)
    fresh.load_state_dict(saved)
    loaded = [s for g in fresh.param_groups if g["experts"] for p in g["params"] for s in fresh.state[p]["experts"]]
    assert len(loaded) == 16 and all("proj_basis" in s and s["step"] == SAVE_AT for s in loaded)


# ---------------------------------------------------------------------- whose defaults (issue 29.1, 33.9)
KEYS = ("rule", "projector", "full_rank", "rank", "update_proj_gap", "scale", "scale_type", "proj_type",
        "moment_policy")


@pytest.mark.parametrize("name", ["apollo_mini", "muon", "flora", "fira", "dct"])
def test_every_other_preset_keeps_its_own_defaults(tmp_path, name):
    """Only transformers' own names take transformers' GaLore defaults; ``optimizer="apollo_mini"`` is
    APOLLO-Mini as built directly (rank 1, scale √128), Muon stays unprojected, Flora keeps gap 1000."""
    model = tiny_llama()
    cls = lrgrad.OPTIMIZERS[lrgrad.ALIASES[name]]
    rank = {"flora": RANK, "fira": RANK, "dct": RANK}.get(name)  # presets without a default rank need one
    options = {} if rank is None else {"rank": rank}
    opt = create_optimizer(model, make_args(tmp_path, optim_args=""), optimizer=name, **options)
    direct = cls(lrgrad.param_groups(tiny_llama(), rank=rank if rank is not None else cls.preset.defaults["rank"],
                                     target_modules=TARGETS), lr=1e-2)
    assert type(opt) is cls
    for key in KEYS:
        assert opt.param_groups[0][key] == direct.param_groups[0][key], key
    if name == "apollo_mini":
        assert (opt.param_groups[0]["rank"], opt.param_groups[0]["scale"]) == (1, 128**0.5)
    if name == "muon":
        assert opt.param_groups[0]["rank"] is None
    if name == "flora":
        assert opt.param_groups[0]["update_proj_gap"] == 1000 and opt.param_groups[0]["scale"] is None


@pytest.mark.parametrize("where", ["optim_args", "keyword", "both"])
def test_lr_and_eps_are_the_optimizers_in_every_group_wherever_they_are_given(tmp_path, where):
    """``optim_args="rank=8, lr=1e-4"`` set the projected group's lr only: the embeddings, head and norms kept
    ``learning_rate``. ``lr``/``eps`` are the optimizer's, as ``weight_decay`` is, wherever they are given;
    a keyword overrides ``optim_args``."""
    text = f"rank={RANK}, lr=1e-4, eps=1e-6" if where != "keyword" else f"rank={RANK}"
    keywords = {"lr": 3e-4, "eps": 1e-7} if where != "optim_args" else {}
    lr, eps = (3e-4, 1e-7) if keywords else (1e-4, 1e-6)
    cls, kwargs = optimizer_cls_and_kwargs(tiny_llama(), make_args(tmp_path, optim_args=text), **keywords)
    assert (kwargs["lr"], kwargs["eps"]) == (lr, eps)
    assert all((group.get("lr", lr), group.get("eps", eps)) == (lr, eps) for group in kwargs["params"])
    opt = cls(kwargs.pop("params"), **kwargs)
    assert {(group["lr"], group["eps"]) for group in opt.param_groups} == {(lr, eps)}
    assert len(opt.param_groups) > 1


def test_a_reused_optimizer_cls_and_kwargs_result_warns_that_nothing_is_projected(tmp_path):
    """The Trainer takes ``"params"`` out of the kwargs dict it is given: a second Trainer built from the same
    result hands GaLoreAdamW its own bare groups, with no rank, and the run was full-rank AdamW in silence."""
    model = tiny_llama()
    cls, kwargs = optimizer_cls_and_kwargs(model, make_args(tmp_path))
    kwargs.pop("params")  # what the first Trainer did
    with pytest.warns(UserWarning, match="none of the param groups given has a rank.*optimizer_cls_and_kwargs"):
        cls([{"params": list(model.parameters())}], **kwargs)


def test_a_projected_preset_without_a_rank_names_the_argument(tmp_path):
    with pytest.raises(ValueError, match="rank.*FloraAdamW"):
        create_optimizer(tiny_llama(), make_args(tmp_path, optim_args=""), optimizer="flora")


def test_an_optim_that_names_no_low_rank_method_is_refused(tmp_path):
    """The Trainer's default ``optim`` (adamw_torch) is never taken to mean GaLoreAdamW."""
    with pytest.raises(ValueError, match="optim.*'adamw_torch'.*names no low-rank method"):
        create_optimizer(tiny_llama(), make_args(tmp_path, optim="adamw_torch"))
    with pytest.raises(ValueError, match="optim.*'adamw_torch'"):
        optimizer_cls_and_kwargs(tiny_llama(), make_args(tmp_path, optim="adamw_torch"))


def installed_transformers_defaults(function: str, variable: str) -> dict:
    """``{key: default}`` of the dict ``variable = {"rank": int(ctx.optim_args.pop("rank", 128)), ...}`` in
    the installed transformers' ``trainer_optimizer.<function>``, read from its source."""
    import ast
    import inspect

    from transformers import trainer_optimizer

    tree = ast.parse(inspect.getsource(getattr(trainer_optimizer, function)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == variable for t in node.targets):
            out = {}
            for key, value in zip(node.value.keys, node.value.values):
                if isinstance(value, ast.Call) and isinstance(value.func, ast.Name):  # int(...) / float(...)
                    value = value.args[0]
                assert isinstance(value, ast.Call) and value.func.attr == "pop", ast.dump(value)
                out[ast.literal_eval(key)] = ast.literal_eval(value.args[1])
            return out
    raise AssertionError(f"no {variable} in transformers.trainer_optimizer.{function}")


def test_trainer_defaults_are_the_installed_transformers_own(tmp_path):
    """transformers' GaLore path (``_get_galore_optimizer``) and APOLLO path fill rank/gap/scale/proj_type
    when ``optim_args`` is silent; the integration fills the same values (read from the installed
    source, not a copy), and the built optimizer carries them."""
    from lrgrad.integrations.transformers import HF_APOLLO_DEFAULTS, HF_LOW_RANK_DEFAULTS

    galore = installed_transformers_defaults("_get_galore_optimizer", "galore_optim_kwargs")
    assert galore == HF_LOW_RANK_DEFAULTS == {"rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}
    apollo = installed_transformers_defaults("_get_apollo_optimizer", "apollo_optim_kwargs")
    assert apollo.pop("proj") == lrgrad.APOLLOAdamW.preset.projector  # "random": APOLLOAdamW's own projector
    assert apollo == HF_APOLLO_DEFAULTS
    for optim, want in [("galore_adamw", galore), ("galore_adafactor", galore), ("apollo_adamw", apollo)]:
        group = create_optimizer(tiny_llama(), make_args(tmp_path, optim=optim, optim_args="")).param_groups[0]
        assert {key: group[key] for key in want} == want, optim


def fsdp2_args(**overrides) -> SimpleNamespace:
    """The fields of TrainingArguments that optimizer_cls_and_kwargs reads, for a 2-rank FSDP2 run."""
    fields = dict(learning_rate=1e-2, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0,
                  optim="galore_adamw", optim_args=f"rank={RANK}", optim_target_modules=TARGETS, world_size=2,
                  save_strategy="steps", fsdp_plugin_args={"fsdp_version": 2, "state_dict_type": "FULL_STATE_DICT"})
    fields.update(overrides)
    return SimpleNamespace(**fields)


def test_fsdp2_full_state_dict_checkpoints_of_expert_stacks_are_refused():
    """FULL_STATE_DICT saves rank 0's optimizer state, which holds rank 0's experts only: refused where a
    checkpoint would be written (tests/distributed/test_hf_fsdp2_moe.py shows the sharded route resuming exactly)."""
    with pytest.raises(ValueError, match=r"fsdp_config\['state_dict_type'\]: FULL_STATE_DICT.*SHARDED_STATE_DICT"):
        optimizer_cls_and_kwargs(tiny_mixtral(), fsdp2_args())
    sharded = {"fsdp_version": 2, "state_dict_type": "SHARDED_STATE_DICT"}
    for fine in (dict(fsdp_plugin_args=sharded), dict(save_strategy="no"), dict(world_size=1),
                 dict(fsdp_plugin_args=None), dict(fsdp_plugin_args={"fsdp_version": 1})):
        cls, kwargs = optimizer_cls_and_kwargs(tiny_mixtral(), fsdp2_args(**fine))
        assert any(g.get("experts") for g in kwargs["params"]), fine
    optimizer_cls_and_kwargs(tiny_llama(), fsdp2_args())  # no expert stacks: nothing a rank keeps alone
