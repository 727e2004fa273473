"""lrgrad.estimate_memory against measured bytes.

Exact: weights (storages of params and buffers), gradients, optimizer + projector state
(``lrgrad.optimizer_state_bytes`` after one step) for every estimator optimizer.
Within 5%: activations, against the bytes a ``transformers`` LLaMA saves for backward.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from tiny_model import TinyLM, lm_loss, make_batch, train

import lrgrad
from lrgrad.estimate import OPTIMIZER_NAMES, make_optimizer


def storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[(s.data_ptr(), s.nbytes())] = s.nbytes()
    return sum(seen.values())


def model_bytes(model: torch.nn.Module) -> int:
    return storage_bytes(list(model.parameters()) + list(model.buffers()))


def tiny(quantized: bool = False, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    model = TinyLM().to(dtype)
    return lrgrad.quantize_weights(model, group_size=32) if quantized else model


CASES = [(name, False, {}) for name in OPTIMIZER_NAMES]
CASES += [(name, True, {}) for name in OPTIMIZER_NAMES if name != "adamw"]
CASES += [("galore8bit", False, {"moment_min_size": 64}), ("qgalore", True, {"moment_min_size": 64}),
          ("qgalore", False, {"proj_bits": 8, "proj_quant_group_size": 64})]


@pytest.mark.parametrize(("name", "quantized", "options"), CASES)
def test_state_and_weights_are_exact(name, quantized, options):
    model = tiny(quantized)
    estimate = lrgrad.estimate_memory(model, optimizer=name, rank=8, **options)
    opt = make_optimizer(model, name, rank=8, lr=1e-3, **options)
    train(model, opt, 1)
    assert estimate.optimizer_state + estimate.projector_state == lrgrad.optimizer_state_bytes(opt)
    projector_keys = sum(v.untyped_storage().nbytes() for s in opt.state.values() for k, v in s.items()
                         if k.startswith("proj_") and isinstance(v, torch.Tensor))
    shared = opt.shared_state_bytes() if hasattr(opt, "shared_state_bytes") else 0
    assert estimate.projector_state == projector_keys + shared
    assert estimate.weights == model_bytes(model)


def test_weight_bits_on_a_float_model_equal_the_quantized_model():
    for bits in (8, 4):
        estimate = lrgrad.estimate_memory(tiny(), optimizer="qgalore", rank=8, weight_bits=bits, weight_group_size=32)
        model = lrgrad.quantize_weights(tiny(), bits=bits, group_size=32)
        assert estimate.weights == model_bytes(model)
        assert estimate.weights == lrgrad.estimate_memory(model, optimizer="qgalore", rank=8).weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_are_exact(dtype):
    model = tiny(dtype=dtype)
    lm_loss(model, make_batch()).backward()
    grads = [p.grad for p in model.parameters()]
    estimate = lrgrad.estimate_memory(model, optimizer="galore", rank=8)
    assert estimate.gradients == sum(g.numel() * g.element_size() for g in grads)
    layerwise = lrgrad.estimate_memory(model, optimizer="galore", rank=8, layerwise=True)
    assert layerwise.gradients == max(g.numel() * g.element_size() for g in grads)


def saved_for_backward(model: torch.nn.Module, tokens: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages autograd saves during one forward."""
    seen = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[(s.data_ptr(), s.nbytes())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, labels=tokens)
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(96, 160, 3, 6, 300, 3, 24), (64, 192, 2, 4, 500, 2, 40)])
def test_activations_within_5_percent_of_a_transformers_llama(dtype, shape):
    transformers = pytest.importorskip("transformers")
    d, f, layers, heads, vocab, batch, seq = shape
    config = transformers.LlamaConfig(hidden_size=d, intermediate_size=f, num_hidden_layers=layers,
                                      num_attention_heads=heads, vocab_size=vocab, max_position_embeddings=128,
                                      attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    measured = saved_for_backward(model, torch.randint(0, vocab, (batch, seq)))
    estimate = lrgrad.estimate_memory(model, optimizer="adamw", batch_size=batch, seq_len=seq)
    assert abs(estimate.activations - measured) <= 0.05 * measured
    # the same numbers from the config alone (dict or LlamaConfig), weights included
    from_config = lrgrad.estimate_memory(config, optimizer="galore", rank=16, dtype=dtype, batch_size=batch,
                                         seq_len=seq)
    from_dict = lrgrad.estimate_memory({"d": d, "ffn": f, "layers": layers, "heads": heads, "vocab": vocab},
                                       optimizer="galore", rank=16, dtype=dtype, batch_size=batch, seq_len=seq)
    from_model = lrgrad.estimate_memory(model, optimizer="galore", rank=16, batch_size=batch, seq_len=seq)
    assert from_config.as_dict() == from_dict.as_dict() | {"details": from_config.details}
    for key in ("gradients", "optimizer_state", "projector_state", "activations"):
        assert getattr(from_config, key) == getattr(from_model, key), key
    # a config has no buffers (the rotary inv_freq of the real model)
    assert from_config.weights == from_model.weights - sum(b.numel() * b.element_size() for b in model.buffers())


def test_paper_claims_on_llama_7b():
    """Q-GaLore (INT8 weights, INT4 bases, 8-bit states, per-layer updates) fits 7B in 16 GB;
    GaLore with per-layer updates and 8-bit states fits in 24 GB; bf16 AdamW fits in neither."""
    qgalore = lrgrad.estimate_memory("llama-7b", optimizer="qgalore", weight_bits=8, layerwise=True,
                                     batch_size=1, seq_len=256)
    galore8 = lrgrad.estimate_memory("llama-7b", optimizer="galore8bit", layerwise=True, batch_size=1, seq_len=256)
    adamw = lrgrad.estimate_memory("llama-7b", optimizer="adamw", batch_size=1, seq_len=256)
    assert qgalore.fits(16) and galore8.fits(24) and not adamw.fits(24)
    assert qgalore.total < galore8.total < adamw.total
    assert "| total |" in qgalore.table() and qgalore.as_dict()["total"] == qgalore.total


def test_bad_input():
    model = TinyLM()
    with pytest.raises(ValueError, match="optimizer"):
        lrgrad.estimate_memory(model, optimizer="sgd")
    with pytest.raises(ValueError, match="rank"):
        lrgrad.estimate_memory(model, optimizer="galore")
    with pytest.raises(ValueError, match="rank"):
        lrgrad.estimate_memory(model, optimizer="galore", rank=0)
    with pytest.raises(ValueError, match="weight_bits"):
        lrgrad.estimate_memory(model, optimizer="galore", rank=8, weight_bits=6)
    with pytest.raises(ValueError, match="weight_group_size"):
        lrgrad.estimate_memory(model, optimizer="galore", rank=8, weight_bits=8, weight_group_size=0)
    with pytest.raises(ValueError, match="optimizer"):
        lrgrad.estimate_memory(model, optimizer="adamw", weight_bits=8, weight_group_size=32)
    with pytest.raises(ValueError, match="batch_size"):
        lrgrad.estimate_memory(model, batch_size=2)
    with pytest.raises(ValueError, match="model_or_config"):
        lrgrad.estimate_memory(model, batch_size=2, seq_len=8)  # no LLaMA config to model activations
    with pytest.raises(ValueError, match="model_or_config"):
        lrgrad.estimate_memory("llama-3b")
    with pytest.raises(ValueError, match="model_or_config"):
        lrgrad.estimate_memory({"d": 64, "layers": 2})
    with pytest.raises(TypeError, match="model_or_config"):
        lrgrad.estimate_memory(3)
    with pytest.raises(TypeError, match="dtype"):
        lrgrad.estimate_memory(model, dtype=torch.int8)


class HeadlessDict(torch.nn.ModuleDict):
    """A model that says it has no output head, as Hugging Face's headless models do (``LlamaModel``):
    without that answer the last linear of the tree would be taken for the head and kept full-rank."""

    def get_output_embeddings(self) -> None:
        return None


def test_world_size_counts_rank0_shards():
    """FSDP2 (``Shard(0)``, rank 0 holds ceil(rows / 3)): weights, gradients, full-rank and right-side
    moments shard by rows, left-side moments and bases are replicated; 8-bit blocks count per shard."""
    model = HeadlessDict({"up": torch.nn.Linear(40, 96, bias=False),  # 96 x 40: right side
                                 "down": torch.nn.Linear(96, 40, bias=False),  # 40 x 96: left side
                                 "embed": torch.nn.Embedding(64, 40)})  # full rank
    est = lrgrad.estimate_memory(model, "galore", rank=8, world_size=3)
    rows = {"up": 32, "down": 14, "embed": 22}  # ceil(96/3), ceil(40/3), ceil(64/3)
    assert est.weights == est.gradients == 4 * (32 * 40 + 14 * 96 + 22 * 40)
    assert est.optimizer_state == 4 * 2 * (rows["up"] * 8 + 8 * 96 + rows["embed"] * 40)
    assert est.projector_state == 4 * (8 * 40 + 40 * 8)
    q = lrgrad.estimate_memory(model, "galore8bit", rank=8, world_size=3, moment_min_size=0,
                               moment_block_size=64)
    # the options reach the projected group; the embedding keeps fp32 moments (880 < 4096 elements)
    codes = 32 * 8 + 8 * 96
    blocks = -(-32 * 8 // 64) + -(-8 * 96 // 64)
    assert q.optimizer_state == 2 * (codes + 4 * blocks) + 4 * 2 * 22 * 40
    assert lrgrad.estimate_memory(model, "galore", rank=8).weights == 4 * (96 * 40 + 40 * 96 + 64 * 40)
    with pytest.raises(ValueError, match="world_size"):
        lrgrad.estimate_memory(model, "galore", rank=8, world_size=0)


@pytest.mark.parametrize("optimizer", ["conda", "ldadam"])
def test_world_size_shards_full_size_projector_state_by_rows(optimizer):
    """Conda's momentum and LDAdam's error buffer (``row_state_keys``, m x n) are ``Shard(0)`` under
    FSDP2: rank 0 holds ceil(m / 3) rows of each; the bases stay replicated."""
    model = HeadlessDict({"up": torch.nn.Linear(40, 96, bias=False),  # 96 x 40: right side
                          "down": torch.nn.Linear(96, 40, bias=False)})  # 40 x 96: left side
    one = lrgrad.estimate_memory(model, optimizer, rank=8)
    three = lrgrad.estimate_memory(model, optimizer, rank=8, world_size=3)
    bases = 4 * (8 * 40 + 40 * 8)
    assert one.projector_state == bases + 4 * 2 * 96 * 40
    assert three.projector_state == bases + 4 * (32 * 40 + 14 * 96)  # ceil(96/3) x 40, ceil(40/3) x 96


# ---------------------------------------------------------------------- each optimizer's own defaults, both routes
def test_each_optimizer_is_estimated_with_its_own_defaults():
    """APOLLO-Mini is rank 1 (its own default), not GaLore's rank for the config; a module needs no rank
    for it; Muon without a rank is unprojected, as built directly."""
    mini = lrgrad.estimate_memory("llama-7b", optimizer="apollo_mini")
    assert mini.details["rank"] == 1
    assert mini.optimizer_state == lrgrad.estimate_memory("llama-7b", optimizer="apollo_mini", rank=1).optimizer_state
    assert mini.optimizer_state < lrgrad.estimate_memory("llama-7b", optimizer="apollo_mini", rank=1024).optimizer_state
    assert lrgrad.estimate_memory("llama-7b", optimizer="galore").details["rank"] == 1024  # no default: GaLore's
    for name, cls in (("apollo_mini", lrgrad.APOLLOMiniAdamW), ("muon", lrgrad.Muon)):
        model = tiny()
        estimate = lrgrad.estimate_memory(model, optimizer=name)  # no rank
        opt = cls(model.named_parameters(), lr=1e-3)  # as a user builds it: the class's own defaults
        train(model, opt, 1)
        assert estimate.optimizer_state + estimate.projector_state == lrgrad.optimizer_state_bytes(opt), name


@pytest.mark.parametrize("name", ["galore", "galore8bit", "dct", "muon"])
def test_both_routes_are_modelled_and_named(name):
    """``Opt(model.parameters(), rank=r)`` projects every matrix (embeddings and head too) and
    ``Opt(model.named_parameters(), rank=r)`` keeps them full-rank: two different states, each estimated
    exactly, and the estimate says which one it modelled."""
    cls = lrgrad.OPTIMIZERS[lrgrad.ALIASES[name]]
    measured = {}
    for route in ("parameters", "named_parameters"):
        model = tiny()
        params = model.parameters() if route == "parameters" else model.named_parameters()
        with pytest.warns(UserWarning, match="named_parameters") if route == "parameters" and name != "muon" else \
                contextlib.nullcontext():
            opt = cls(params, rank=8, lr=1e-3)
        train(model, opt, 1)
        estimate = lrgrad.estimate_memory(tiny(), optimizer=name, rank=8, route=route)
        measured[route] = lrgrad.optimizer_state_bytes(opt)
        assert estimate.optimizer_state + estimate.projector_state == measured[route], route
        assert estimate.details["route"] == route and f"model.{route}()" in estimate.table()
    assert measured["parameters"] != measured["named_parameters"]
    with pytest.raises(ValueError, match="route"):
        lrgrad.estimate_memory(tiny(), optimizer=name, rank=8, route="modules")
