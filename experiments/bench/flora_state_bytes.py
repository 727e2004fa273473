"""Optimizer-state bytes of one 4096x4096 fp32 layer at rank 512: GaLore (stored basis) vs Flora (seed only)."""

import torch

import lrgrad


def one(cls: type, **kw) -> tuple[int, int, dict]:
    w = torch.nn.Parameter(torch.randn(4096, 4096) * 0.02)
    opt = cls([{"params": [w], "rank": 512}], lr=1e-3, **kw)
    w.grad = torch.randn(4096, 4096)
    opt.step()
    state = opt.state[w]
    basis = sum(v.numel() * v.element_size() for k, v in state.items()
                if k.startswith("proj_") and isinstance(v, torch.Tensor))
    keys = {k: (tuple(v.shape) if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    return lrgrad.optimizer_state_bytes(opt), basis, keys


if __name__ == "__main__":
    torch.manual_seed(0)
    for cls, kw in [(lrgrad.GaLoreAdamW, {"svd": "randomized"}), (lrgrad.FloraAdamW, {}),
                    (lrgrad.GaLoreAdafactor, {"svd": "randomized"}), (lrgrad.FloraAdafactor, {})]:
        total, basis, keys = one(cls, **kw)
        print(f"{cls.__name__:16s} total={total:>10d} B ({total / 2**20:.3f} MiB)  basis={basis:>9d} B  {keys}")
