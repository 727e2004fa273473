"""Flora presets: AdamW / Adafactor inside the seeded random projector.

"Flora: Low-Rank Adapters Are Secretly Gradient Compressors",
Hao, Cao & Mou 2024, arXiv:2402.03293.

For a projected m x n matrix (``proj_type="std"`` compresses the smaller side, as
Flora does), with ``P`` a random matrix regenerated from the parameter's seed
and resampled every κ = ``update_proj_gap`` steps (Flora's default κ = 1000):

.. math::
    R_t = \\mathrm{down}_{P}(G_t), \\quad u_t = \\mathrm{rule}(R_t), \\quad
    W_t = W_{t-1}(1 - \\eta\\lambda) - \\eta\\,\\alpha\\,\\mathrm{up}_{P}(u_t)

On a resample the first moment moves with ``m <- down_new(up_old(m))``; second
moments follow ``random_v_transfer="auto"``: the quadratic transfer for Gaussian
draws (which keeps ``m/sqrt(v)`` in scale, since Flora's transfer inflates
``‖m‖²`` by d/r), their mean over the projected axis for orthonormal draws (see
``lrgrad.projectors.random``). The optimizer state holds the moments and a few
ints per matrix - no basis. ``scale`` defaults to 1: Gaussian draws satisfy
``E[up(down(G))] = G``, so no GaLore-style α is needed (with
``random_basis="orthonormal"`` the expectation is ``(r/d) G``; raise ``scale``).
"""

from __future__ import annotations

from typing import Any

from lrgrad.optim.generic import LowRankAdafactor, LowRankAdamW, ParamsT
from lrgrad.optim.registry import register_optimizer


@register_optimizer("flora")
class FloraAdamW(LowRankAdamW):
    """AdamW on Flora-compressed gradients (arXiv:2402.03293).

    ``FloraAdamW(model.parameters(), rank=128)`` compresses every matrix whose
    smaller side exceeds 128; other params (and groups without a ``rank``) run
    plain AdamW. ``seed`` makes the random matrices reproducible: the same seed and
    parameter order give the same matrices on every DDP rank and after a resume.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        rank: int | None = None,
        update_proj_gap: int = 1000,
        scale: float | None = None,
        proj_type: str = "std",
        moment_policy: str = "project",
        random_basis: str = "gaussian",
        seed: int = 0,
        **options: Any,
    ):
        super().__init__(params, lr, betas, eps, weight_decay, projector="random", rank=rank,
                         update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                         moment_policy=moment_policy, random_basis=random_basis, seed=seed, **options)


@register_optimizer("flora_adafactor")
class FloraAdafactor(LowRankAdafactor):
    """Adafactor on Flora-compressed gradients, as in Flora's reference (arXiv:2402.03293).

    Factored second moment in the compressed space; the first moment is off
    unless ``beta1`` is set (then it is Flora's compressed momentum, carried across
    resamples by ``down_new(up_old(m))``).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-2,
        beta1: float | None = None,
        beta2_decay: float = -0.8,
        eps: float = 1e-30,
        clip_threshold: float = 1.0,
        weight_decay: float = 0.0,
        *,
        rank: int | None = None,
        update_proj_gap: int = 1000,
        scale: float | None = None,
        proj_type: str = "std",
        moment_policy: str = "project",
        random_basis: str = "gaussian",
        seed: int = 0,
        **options: Any,
    ):
        super().__init__(params, lr, beta1, beta2_decay, eps, clip_threshold, weight_decay, projector="random",
                         rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                         moment_policy=moment_policy, random_basis=random_basis, seed=seed, **options)
