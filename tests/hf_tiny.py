"""A tiny LLaMA built from a config (no hub download) and a token dataset, for the Trainer/Accelerate tests.

FFN width 35 (not divisible by 2) gives uneven FSDP2 shards, like tests/distributed's TinyLM;
every attention/MLP matrix has min side 32 > rank 8. fp64 so sharded and single-process runs
can be compared at the tolerance tests/distributed uses.
"""

from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

VOCAB = 64
SEQ = 16
RANK = 8
GAP = 2  # subspace refreshes on steps 1, 3, 5, ...


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=35, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(torch.float64)


def tiny_mixtral(seed: int = 0, experts: int = 4, top_k: int = 2) -> torch.nn.Module:
    """A tiny Mixtral (fused 3-D expert stacks (experts, 96, 32) and (experts, 32, 48)), fp32."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
                           num_experts_per_tok=top_k, max_position_embeddings=64)
    torch.manual_seed(seed)
    return MixtralForCausalLM(config)


def tiny_qwen3_moe(seed: int = 0, experts: int = 4, top_k: int = 2) -> torch.nn.Module:
    """A tiny Qwen3-MoE (every layer sparse; the same fused stacks as ``tiny_mixtral``, a router of its own), fp32."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=48,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True,
                            decoder_sparse_step=1, max_position_embeddings=64)
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(config)


class TokenDataset(torch.utils.data.Dataset):
    """Rows of the learnable rule next = 5 * current + 3 (mod VOCAB); labels = input_ids (HF shifts them)."""

    def __init__(self, rows: int = 32):
        from tiny_model import make_batch

        self.tokens = make_batch(batch=rows, seq=SEQ, seed=1234, vocab=VOCAB)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters by name as plain full tensors (FSDP2 DTensors all-gathered)."""
    out = {}
    for name, p in model.named_parameters():
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = p.detach().clone()
    return out


def reset_accelerate() -> None:
    """Forget Accelerate's process-wide singletons (a Trainer or Accelerator from an earlier test)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
