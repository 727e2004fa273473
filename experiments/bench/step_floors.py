"""Floors and anchors for ``bench_step.py``: what each optimizer family's step should cost.

A *floor* is the least work an optimizer of a family must do on the model, built from the
fastest torch/peer pieces: the projection GEMMs of every projected matrix (``R = G Pᵀ`` and
the back-projection, as ``addmm`` into the weight) plus the family's elementwise rule run by
its fastest known implementation on the full-rank params and on tensors shaped like the
low-rank moments. An *anchor* is the fastest peer library doing the same job, as users would
run it (e.g. galore-torch's ``GaLoreAdamW``). Both are stepped round-robin with the lrgrad
optimizers in the same run, so their ratios are load-independent.

Peers that are not installed are left out (``pip install --no-deps bitsandbytes galore-torch``:
see docs/experiments.md); torch's own (``AdamW``, ``Adafactor``, ``Muon``) are always there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import lrgrad
from lrgrad.kernels.precision import native_bf16_matmul

#: the bare Newton–Schulz floor in the precision lrgrad's ``ns_dtype="auto"`` picks on this CPU
_AUTO_NS = "_bf16" if native_bf16_matmul("cpu") else ""

#: optimizer name -> (floor name, anchor name); None: no such row for that family
FAMILIES: dict[str, tuple[str | None, str | None]] = {
    "galore_adamw": ("floor_adamw", "galore_torch"),
    "galore_adamw_guarded": ("floor_adamw", "galore_torch"),
    "dct_adamw": ("floor_adamw", "galore_torch"),
    "flora_adamw": ("floor_adamw_draw", "galore_torch"),
    "online_subspace_adamw": ("floor_adamw_pca_step", "galore_adamw"),
    "galore_adamw8bit": ("floor_adamw8bit", "bnb_adamw8bit"),
    "qgalore_adamw": ("floor_adamw8bit", "bnb_adamw8bit"),
    "galore_adafactor": ("floor_adafactor", "torch_adafactor"),
    "dct_adafactor": ("floor_adafactor", "torch_adafactor"),
    "flora_adafactor": ("floor_adafactor", "torch_adafactor"),
    # Newton–Schulz precision like for like: bf16 rows beside torch.optim.Muon (bf16 iterates) and the bare
    # bf16 NS; fp32 rows beside the bare fp32 NS; the default (ns_dtype="auto") beside the floor of its precision
    "muon": (f"floor_muon{_AUTO_NS}", "torch_muon"),
    "muon_bf16": ("floor_muon_bf16", "torch_muon"),
    "muon_fp32": ("floor_muon", "floor_muon"),
    "hybrid_auon": (f"floor_muon_ns1{_AUTO_NS}", "torch_muon"),
    "hybrid_auon_bf16": ("floor_muon_ns1_bf16", "torch_muon"),
    "hybrid_auon_fp32": ("floor_muon_ns1", "floor_muon_ns1"),
    "auon": ("adamw_fused", "muon"),
    # the newer methods (docs/grass.md, frugal.md, golore.md, conda.md, ldadam.md) beside the GaLore floor and
    # pytorch-optimizer's implementation where it has one (its GaLore for those it has not)
    "grass_adamw": ("floor_adamw", "po_galore"),
    "golore_adamw": ("floor_adamw", "po_galore"),
    "frugal_adamw": ("floor_adamw", "po_fira"),
    "fira_adamw": ("floor_adamw", "po_fira"),
    "apollo_adamw": ("floor_adamw_draw", "po_apollo"),
    "conda_adamw": ("floor_adamw", "po_conda"),
    "ldadamw": ("floor_adamw", "po_galore"),
}

#: floors measured beside a family's own floor: online PCA's BᵀG-only floor (the least any online PCA
#: step adds to GaLore's GEMMs) next to the floor of the step it really takes
ALSO_MEASURED: dict[str, tuple[str, ...]] = {"online_subspace_adamw": ("floor_adamw_pca",)}

LABELS = {
    "floor_adamw": "floor: projection GEMMs + fused AdamW",
    "floor_adamw_draw": "floor: seeded Gaussian draws + projection GEMMs + fused AdamW",
    "floor_adamw_pca": "floor: projection GEMMs + online PCA's BᵀG GEMM + fused AdamW",
    "floor_adamw_pca_step": "floor: projection GEMMs + online PCA's whole step (‖G‖, BᵀG, K, Adam on P, "
                            "Cholesky QR) + fused AdamW",
    "floor_adamw8bit": "floor: projection GEMMs + bnb AdamW8bit",
    "floor_adafactor": "floor: projection GEMMs + torch Adafactor",
    "floor_muon": "floor: 5 fp32 Newton–Schulz steps (hidden) + fused AdamW (rest)",
    "floor_muon_ns1": "floor: 1 fp32 Newton–Schulz step (hidden) + fused AdamW (rest)",
    "floor_muon_bf16": "floor: 5 bf16 Newton–Schulz steps (hidden) + fused AdamW (rest)",
    "floor_muon_ns1_bf16": "floor: 1 bf16 Newton–Schulz step (hidden) + fused AdamW (rest)",
    "galore_torch": "galore-torch GaLoreAdamW",
    "bnb_adamw8bit": "bitsandbytes AdamW8bit (full rank)",
    "torch_adafactor": "torch Adafactor (foreach, full rank)",
    "torch_muon": "torch Muon (hidden) + fused AdamW (rest)",
    "po_galore": "pytorch-optimizer GaLore",
    "po_apollo": "pytorch-optimizer APOLLO",
    "po_fira": "pytorch-optimizer Fira",
    "po_conda": "pytorch-optimizer Conda (full rotation, hidden) + fused AdamW (rest)",
}


@dataclass
class Runner:
    """One timed thing: ``step()`` advances it once; ``state_bytes`` is None for floors."""

    step: Callable[[], None]
    state_bytes: Callable[[], int] | None = None


def split_params(model: torch.nn.Module, rank: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(projected matrices, everything else) as ``lrgrad.param_groups`` splits them."""
    groups = lrgrad.param_groups(model, rank=rank)
    mats = [p for _, p in groups[0]["params"] if min(p.shape) > rank]
    projected = {id(p) for p in mats}
    rest = [p for p in model.parameters() if id(p) not in projected]
    return mats, rest


def hidden_and_rest(model: torch.nn.Module, rank: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(every 2-D weight of the blocks, everything else): Muon's matrices vs AdamW's."""
    groups = lrgrad.param_groups(model, rank=rank)
    hidden = [p for _, p in groups[0]["params"] if p.dim() == 2]
    chosen = {id(p) for p in hidden}
    return hidden, [p for p in model.parameters() if id(p) not in chosen]


def _proxies(mats: list[torch.Tensor], rest: list[torch.Tensor], rank: int):
    """Random bases, and leaf tensors shaped like the full-rank params + the low-rank moments."""
    bases, lows = [], []
    for p in mats:
        m, n = p.shape
        right = m >= n
        bases.append(torch.randn(rank, n) if right else torch.randn(m, rank))
        lows.append(torch.zeros(m, rank) if right else torch.zeros(rank, n))
    proxies = [torch.zeros_like(p, requires_grad=True) for p in rest]
    proxies += [t.requires_grad_() for t in lows]
    for t in proxies:
        t.grad = torch.randn_like(t) * 1e-3
    return bases, proxies


def _projection_gemms(mats: list[torch.Tensor], bases: list[torch.Tensor], pca: bool = False) -> None:
    """``R = down(G)`` and the back-projection into the weight; ``pca``: also online PCA's second
    m x n x r product ``C = BᵀG`` (its loss gradient needs it; ``B = G Pᵀ`` is R itself)."""
    with torch.no_grad():
        for p, basis in zip(mats, bases):
            if p.shape[0] >= p.shape[1]:
                low = p.grad @ basis.T
                if pca:
                    _ = low.T @ p.grad
                p.addmm_(low, basis, alpha=-1e-12)
            else:
                low = basis.T @ p.grad
                if pca:
                    _ = p.grad @ low.T
                p.addmm_(basis, low, alpha=-1e-12)


def projection_floor(model: torch.nn.Module, rank: int, make_rule: Callable[[list], torch.optim.Optimizer],
                     draw: bool = False, pca: bool = False) -> Runner:
    """The projection GEMMs of every projected matrix + ``make_rule`` over full-rank and low-rank proxies.

    ``draw``: each step first regenerates every basis from a seeded generator (``torch.randn``), the
    least a projector that stores only a seed (Flora) must add."""
    mats, rest = split_params(model, rank)
    bases, proxies = _proxies(mats, rest, rank)
    rule = make_rule(proxies)
    generator = torch.Generator()

    def step() -> None:
        if draw:
            for i, basis in enumerate(bases):
                generator.manual_seed(i)
                bases[i] = torch.randn(basis.shape, generator=generator)
        _projection_gemms(mats, bases, pca)
        rule.step()

    return Runner(step)


def gemm_work(model: torch.nn.Module, rank: int) -> dict[str, int]:
    """Multiply-adds of the projected matrices' GEMMs in one steady-state step (m x n, r, d = min(m, n)):
    GaLore/DCT/Flora ``2·m·n·r`` (``R = down(G)`` and the back-projection); online PCA adds
    ``C = BᵀĜ`` (another ``m·n·r``: the loss gradient needs G's covariance applied to P, which the
    projection ``B = ĜPᵀ`` alone cannot give) and four ``r²·d`` products (``K = C Pᵀ``, ``K P``, the
    Gram ``P Pᵀ``, ``L⁻¹ P``). The ratio is a lower bound on online PCA's GEMM time over GaLore's
    that no implementation of the method can go under."""
    mats, _ = split_params(model, rank)
    projection = sum(2 * p.shape[0] * p.shape[1] * rank for p in mats)
    pca_extra = sum(p.shape[0] * p.shape[1] * rank + 4 * rank * rank * min(p.shape) for p in mats)
    return {"galore": projection, "online_pca": projection + pca_extra}


def pca_step_floor(model: torch.nn.Module, rank: int, pca_lr: float = 5e-3) -> Runner:
    """:func:`projection_floor` with online PCA's whole per-step arithmetic and no bookkeeping: per
    matrix ``‖G‖``, ``B = G Pᵀ`` (also R), ``C = BᵀG/‖G‖²``, ``K = C Pᵀ``, the loss gradient
    ``2 (K P − C)``; one multi-tensor ``torch._fused_adamw_`` call over every P; per matrix the Gram
    ``P Pᵀ``, its Cholesky factor L and ``P ← L⁻¹ P`` (the QR the default ``pca_ortho_tol`` needs at
    ``pca_lr=5e-3``, where Adam moves P past the tolerance every step); the back-projection; fused
    AdamW over the full-rank params and the low-rank moments. Everything in the right-side form
    (P r x d on the smaller side d), as the projector computes it."""
    mats, rest = split_params(model, rank)
    _, proxies = _proxies(mats, rest, rank)
    rule = torch.optim.AdamW(proxies, lr=1e-3, fused=True)
    generator = torch.Generator().manual_seed(0)
    bases = []
    for p in mats:
        q, _ = torch.linalg.qr(torch.randn(min(p.shape), rank, generator=generator))
        bases.append(q.T.contiguous())  # r x d, orthonormal rows
    moments = [torch.zeros_like(b) for b in bases], [torch.zeros_like(b) for b in bases]
    eye = torch.eye(rank)
    steps = [0]

    def step() -> None:
        steps[0] += 1
        lows, loss_grads = [], []
        for p, basis in zip(mats, bases):
            g = p.grad if p.shape[0] >= p.shape[1] else p.grad.T  # the right-side form: g is m' x d
            inv_sq = torch.linalg.vector_norm(g).square().reciprocal()
            low = g @ basis.T
            c = (low.T @ g).mul_(inv_sq)
            loss_grads.append(torch.addmm(c, c @ basis.T, basis, beta=-1).mul_(2))
            lows.append(low)
        step_t = [torch.tensor(float(steps[0]))] * len(bases)
        torch._fused_adamw_(bases, loss_grads, *moments, [], step_t, amsgrad=False, lr=pca_lr, beta1=0.9,
                            beta2=0.999, weight_decay=0.0, eps=1e-8, maximize=False)
        with torch.no_grad():
            for i, (p, low) in enumerate(zip(mats, lows)):
                chol, _ = torch.linalg.cholesky_ex(bases[i] @ bases[i].T)
                bases[i] = torch.linalg.solve_triangular(chol, eye, upper=False) @ bases[i]
                if p.shape[0] >= p.shape[1]:
                    p.addmm_(low, bases[i], alpha=-1e-12)
                else:
                    p.addmm_(bases[i].T, low.T, alpha=-1e-12)
        rule.step()

    return Runner(step)


def newton_schulz_floor(model: torch.nn.Module, rank: int, ns_steps: int,
                        dtype: torch.dtype = torch.float32) -> Runner:
    """``ns_steps`` quintic Newton–Schulz iterations with iterates in ``dtype`` on every block matrix (the
    bare ``addmm`` calls, on the smaller Gram side) + the weight update, and fused AdamW on the rest."""
    hidden, rest = hidden_and_rest(model, rank)
    proxies = [torch.zeros_like(p, requires_grad=True) for p in rest]
    for src, dst in zip(rest, proxies):
        dst.grad = src.grad.clone()
    adam = torch.optim.AdamW(proxies, lr=3e-3, fused=True)
    a, b, c = 3.4445, -4.7750, 2.0315

    def step() -> None:
        with torch.no_grad():
            for p in hidden:
                x = p.grad.T if p.shape[0] > p.shape[1] else p.grad
                x = (x / (torch.linalg.vector_norm(x) + 1e-7)).to(dtype)
                for _ in range(ns_steps):
                    gram = x @ x.T
                    x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
                x = x.to(p.dtype)
                p.add_(x.T if p.shape[0] > p.shape[1] else x, alpha=-1e-12)
        adam.step()

    return Runner(step)


def torch_muon(model: torch.nn.Module, rank: int) -> Runner:
    """``torch.optim.Muon`` on the block matrices + fused AdamW on the rest (embeddings, head, norms).
    torch's Newton–Schulz casts the momentum to bf16 and iterates there (5 steps, Muon's coefficients)."""
    hidden, rest = hidden_and_rest(model, rank)
    muon = torch.optim.Muon(hidden, lr=0.01)
    adam = torch.optim.AdamW(rest, lr=3e-3, fused=True)

    def step() -> None:
        muon.step()
        adam.step()

    def state_bytes() -> int:
        return lrgrad.optimizer_state_bytes(muon) + lrgrad.optimizer_state_bytes(adam)

    return Runner(step, state_bytes)


def bnb_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # an absent or a broken install alike: the row is left out
        return False
    return True


def galore_torch_available() -> bool:
    try:
        import galore_torch  # noqa: F401
    except Exception:
        return False
    return True


def pytorch_optimizer_available() -> bool:
    try:
        import pytorch_optimizer  # noqa: F401
    except ImportError:
        return False
    return True


def pytorch_optimizer_peer(name: str, model: torch.nn.Module, rank: int) -> Runner | None:
    """pytorch-optimizer's GaLore / APOLLO / Fira (its galore-torch-style groups: the block matrices with
    rank, gap beyond the run, scale, projection type) and Conda (its own full rotation on the block
    matrices, fused AdamW on the rest); None when the package is not installed."""
    if not pytorch_optimizer_available():
        return None
    import pytorch_optimizer as po

    mats, rest = split_params(model, rank)
    if name == "po_conda":
        conda = po.Conda(mats, lr=1e-3, update_proj_gap=10**9)
        adamw = torch.optim.AdamW(rest, lr=1e-3, fused=True)

        def step() -> None:
            conda.step()
            adamw.step()

        return Runner(step, lambda: lrgrad.optimizer_state_bytes(conda) + lrgrad.optimizer_state_bytes(adamw))
    cls, scale, projection = {"po_galore": (po.GaLore, 0.25, "std"), "po_apollo": (po.APOLLO, 1.0, "random"),
                              "po_fira": (po.Fira, 0.25, "std")}[name]
    opt = cls([{"params": rest}, {"params": mats, "rank": rank, "update_proj_gap": 10**9, "scale": scale,
                                  "projection_type": projection}], lr=1e-2)
    return Runner(opt.step, lambda: lrgrad.optimizer_state_bytes(opt))


def build_reference(name: str, model: torch.nn.Module, rank: int) -> Runner | None:
    """A floor or anchor runner by name; None when its peer library is not installed."""
    if name.startswith("po_"):
        return pytorch_optimizer_peer(name, model, rank)
    if name in ("floor_adamw", "floor_adamw_draw", "floor_adamw_pca"):
        return projection_floor(model, rank, lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
                                draw=name == "floor_adamw_draw", pca=name == "floor_adamw_pca")
    if name == "floor_adamw_pca_step":
        return pca_step_floor(model, rank)
    if name == "floor_adafactor":
        return projection_floor(model, rank, lambda ps: torch.optim.Adafactor(ps, lr=1e-2, foreach=True))
    if name == "floor_adamw8bit":
        if not bnb_available():
            return None
        import bitsandbytes as bnb

        return projection_floor(model, rank, lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3))
    if name.startswith("floor_muon"):  # floor_muon[_ns1][_bf16]
        dtype = torch.bfloat16 if name.endswith("_bf16") else torch.float32
        return newton_schulz_floor(model, rank, 1 if "_ns1" in name else 5, dtype)
    if name == "torch_muon":
        return torch_muon(model, rank)
    if name == "torch_adafactor":
        opt = torch.optim.Adafactor(model.parameters(), lr=1e-2, foreach=True)
        return Runner(opt.step, lambda: lrgrad.optimizer_state_bytes(opt))
    if name == "bnb_adamw8bit":
        if not bnb_available():
            return None
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
        return Runner(opt.step, lambda: lrgrad.optimizer_state_bytes(opt))
    if name == "galore_torch":
        if not galore_torch_available():
            return None
        from galore_torch import GaLoreAdamW

        mats, rest = split_params(model, rank)
        # galore-torch's own recipe: projected matrices in a group with rank/gap/scale/proj_type
        opt = GaLoreAdamW([{"params": rest}, {"params": mats, "rank": rank, "update_proj_gap": 10**9,
                                               "scale": 0.25, "proj_type": "std"}], lr=1e-2, weight_decay=0.0,
                          no_deprecation_warning=True)
        return Runner(opt.step, lambda: lrgrad.optimizer_state_bytes(opt))
    raise ValueError(f"Invalid reference: {name!r}")


def galore_torch_refresh(model: torch.nn.Module, rank: int) -> Runner | None:
    """galore-torch GaLoreAdamW refreshing on every second step (gap 2)."""
    if not galore_torch_available():
        return None
    from galore_torch import GaLoreAdamW

    mats, rest = split_params(model, rank)
    opt = GaLoreAdamW([{"params": rest}, {"params": mats, "rank": rank, "update_proj_gap": 2, "scale": 0.25,
                                           "proj_type": "std"}], lr=1e-2, weight_decay=0.0,
                          no_deprecation_warning=True)
    return Runner(opt.step)
