"""A tiny LLaMA-shaped model and task for optimizer tests (pure torch, milliseconds per step).

Shapes are chosen so every projected matrix has min side 32 > rank 8, and the
model has the parameter kinds a real LLM has: embedding, attention and MLP
matrices, RMSNorm weights, biases, an output head.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import lrgrad

VOCAB = 64


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn_norm = RMSNorm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.mlp_norm = RMSNorm(dim)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=True)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.attn_norm(x)
        q, k, v = (proj(h).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(att.transpose(1, 2).reshape(b, t, d))
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class TinyLM(nn.Module):
    def __init__(self, dim: int = 32, hidden: int = 64, layers: int = 2, heads: int = 4, vocab: int = VOCAB):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, hidden, heads) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def make_batch(batch: int = 8, seq: int = 16, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    """Sequences following a fixed rule (next = 5 * current + 3 mod vocab): learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    tokens = [start]
    for _ in range(seq - 1):
        tokens.append((tokens[-1] * 5 + 3) % vocab)
    return torch.cat(tokens, dim=1)


def lm_loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, batch_seed: int = 0) -> list[float]:
    """Plain loop; returns the loss of every step."""
    losses = []
    for i in range(steps):
        tokens = make_batch(seed=batch_seed + i)
        optimizer.zero_grad()
        loss = lm_loss(model, tokens)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def run_windows(model: nn.Module, name: str, layerwise: bool, windows: int, accumulation: int,
                max_norm: float | None, scheduler: bool = False, **options):
    """``windows`` optimizer steps of ``lrgrad.OPTIMIZERS[name]`` (rank 8, refresh gap 2, lr 0.02), each over
    ``accumulation`` micro-batches, clipped to ``max_norm`` (None: no clip) and, with ``scheduler``, halving
    the lr per step: with ``layerwise`` through ``lrgrad.LayerwiseOptimizer`` (stepped per micro-batch),
    else the ordinary loop. Returns ``(optimizer, layerwise wrapper or None)``."""
    opt = lrgrad.OPTIMIZERS[name](lrgrad.param_groups(model, rank=8, update_proj_gap=2), lr=0.02, **options)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5) if scheduler else None
    lw = lrgrad.LayerwiseOptimizer(opt, accumulation, max_norm, scheduler=sched) if layerwise else None
    for w in range(windows):
        for micro in range(accumulation):
            loss = lm_loss(model, make_batch(batch=4, seed=w * accumulation + micro)) / accumulation
            loss.backward()
            if layerwise:
                lw.step()
        if not layerwise:
            if max_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            opt.step()
            if sched is not None:
                sched.step()
            opt.zero_grad()
    return opt, lw

