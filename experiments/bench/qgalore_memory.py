"""Optimizer-state bytes on LLaMA-60M shapes (rank 128): AdamW, GaLore, GaLore-8bit, Q-GaLore."""
import torch

import lrgrad

layer = [(512, 512)] * 4 + [(1376, 512)] * 2 + [(512, 1376)]
matrices = layer * 8
full = [(32000, 512), (32000, 512)] + [(512,)] * 17  # embeddings, head, norms


def bytes_after_one_step(cls, shapes, **kw):
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    projected = [p for p in params if p.dim() == 2 and max(p.shape) <= 1376]  # decoder matrices
    rest = [p for p in params if not any(p is q for q in projected)]  # embeddings, head, norms: full-rank
    groups = [{"params": projected, "rank": 128}, {"params": rest}]
    groups = [g for g in groups if g["params"]]
    if cls is torch.optim.AdamW:
        opt = cls(groups, lr=1e-3)
    else:
        opt = cls(groups, lr=1e-3, svd="randomized", **kw)  # bytes do not depend on the SVD method
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    if cls is torch.optim.AdamW:  # its scalar step tensors are not counted
        return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                   if torch.is_tensor(t) and t.dim())
    return lrgrad.optimizer_state_bytes(opt)


print("| optimizer | projected matrices (8 layers) | whole LLaMA-60M (+ embed/head/norms) |")
print("|---|---|---|")
res = {}
OPTS = [("torch.optim.AdamW", torch.optim.AdamW), ("GaLoreAdamW", lrgrad.GaLoreAdamW),
        ("GaLoreAdamW8bit", lrgrad.GaLoreAdamW8bit), ("QGaLoreAdamW", lrgrad.QGaLoreAdamW)]
for name, cls in OPTS:
    a = bytes_after_one_step(cls, matrices)
    b = bytes_after_one_step(cls, matrices + full)
    res[name] = (a, b)
    print(f"| {name} | {a/2**20:.2f} MiB | {b/2**20:.2f} MiB |")
g, q = res["GaLoreAdamW"], res["QGaLoreAdamW"]
print(f"QGaLoreAdamW / GaLoreAdamW: matrices {q[0]/g[0]:.3f}, whole model {q[1]/g[1]:.3f}")
