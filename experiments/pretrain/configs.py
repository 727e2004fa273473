"""LLaMA model configurations of the GaLore paper (arXiv:2403.03507), plus small CPU sizes.

Names count parameters at the paper's vocabulary of 32000 (C4 with the T5 tokenizer);
with the byte-level corpus (vocab 256) the same shapes are much smaller, as the embedding
and head shrink. ``rank`` is the paper's GaLore rank for that size (tiny sizes: d/4).
"""

from __future__ import annotations

from typing import Any

from lrgrad.estimate import LLAMA_CONFIGS, LLAMA_RANKS


def _paper_size(name: str) -> dict[str, int]:
    """A paper size in transformers' names, from the one table of paper shapes (``lrgrad.estimate``)."""
    shape = LLAMA_CONFIGS[name]
    return {"hidden_size": shape["d"], "intermediate_size": shape["ffn"], "num_hidden_layers": shape["layers"],
            "num_attention_heads": shape["heads"], "rank": LLAMA_RANKS[name]}


#: name -> hidden size, MLP size, layers, heads, GaLore rank: CPU sizes, then the paper's (llama_60m ... llama_7b)
MODEL_CONFIGS: dict[str, dict[str, int]] = {
    "llama_9m": {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4, "num_attention_heads": 4,
                 "rank": 32},
    "llama_20m": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
                  "rank": 64},
    # the long-run CPU size (experiments/bench/long_run.py): 10.8M params at byte level, ~1 s a step on one thread
    "llama_35m": {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 6,
                  "rank": 96},
    **{name.replace("-", "_"): _paper_size(name) for name in LLAMA_CONFIGS},
}

#: a tiny shape for tests only (not a paper size)
TEST_CONFIGS: dict[str, dict[str, int]] = {
    "llama_test": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "rank": 8},
}


def get_config(name: str) -> dict[str, int]:
    """Shape of a named configuration (a copy); ``ValueError`` listing the choices if unknown."""
    table = {**MODEL_CONFIGS, **TEST_CONFIGS}
    if name not in table:
        raise ValueError(f"Invalid config: {name!r}; choose one of {', '.join(MODEL_CONFIGS)}")
    return dict(table[name])


def llama_config(name: str, vocab_size: int = 32000, max_seq_len: int = 1024, **overrides: Any):
    """A ``transformers.LlamaConfig`` built locally (no hub download)."""
    from transformers import LlamaConfig

    shape = get_config(name)
    shape.pop("rank")
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        max_position_embeddings=max_seq_len,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        hidden_act="silu",
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    kwargs.update(shape)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_model(name: str, vocab_size: int = 32000, max_seq_len: int = 1024, dtype=None, **overrides: Any):
    """``LlamaForCausalLM`` for a named configuration, eager attention, on the CPU."""
    import torch
    from transformers import LlamaForCausalLM

    config = llama_config(name, vocab_size, max_seq_len, **overrides)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(torch.device("cpu"))


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
