r"""The one table of named optimizers: each is a (projector, rule, full_rank) and the defaults it changes.

Every named optimizer (``GaLoreAdamW``, ``FloraAdamW``, ``Muon``, ...) is ``LowRankOptimizer`` with a
projector, an update rule and the few hyperparameters in which the method differs from the
defaults of that rule, that projector and ``lrgrad.optim.lowrank.BASE_DEFAULTS`` — as optax writes
``nadamw = partial(adamw, nesterov=True)``. ``PRESETS`` below is that table; from it
:func:`build_preset_class` makes each class (its keyword signature lists every hyperparameter with
its default, so ``help()`` and IDEs show them), and the registry (``lrgrad.OPTIMIZERS`` /
``lrgrad.ALIASES``), the memory estimator, the Hugging Face Trainer integration and the experiments
CLI read their names and defaults from the same rows.

A row names only what it changes; ``parent`` rows pass theirs on (``APOLLOMiniAdamW`` is
``APOLLOAdamW`` with rank 1, a tensor-wise scale and α = √128). Adding a method is adding a row::

    Preset("GaLoreLion", parent="LowRankLion", projector="svd", choose_projector=False, aliases=("galore_lion",),
           doc="Lion inside GaLore's SVD subspace (arXiv:2403.03507 x arXiv:2302.06675).")
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from lrgrad._checks import check_bool, check_lr
from lrgrad.groups import caller_stacklevel, refuse_module
from lrgrad.optim.adafactor_compat import translate_adafactor_kwargs
from lrgrad.optim.embedding_routing import route_embeddings_to_adamw
from lrgrad.optim.full_rank import FULL_RANK_DEFAULTS
from lrgrad.optim.lowrank import BASE_DEFAULTS, LowRankOptimizer
from lrgrad.optim.registry import register_optimizer
from lrgrad.projectors import PROJECTORS
from lrgrad.rules import RULES

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]

#: ``LowRankOptimizer``'s own lr default (a preset row may change it)
BASE_LR = 1e-3
#: APOLLO-Mini's gradient scale α = √128 (the paper's setting for its rank-1, tensor-wise variant)
APOLLO_MINI_SCALE = math.sqrt(128.0)
#: the keyword-only hyperparameters every signature lists first (galore-torch's group keys first)
HEADLINE_KEYS = ("rank", "update_proj_gap", "scale", "proj_type", "moment_policy")
#: the keys of ``BASE_DEFAULTS`` that belong to ``full_rank``; listed only by presets that set it
FULL_RANK_KEYS = tuple(FULL_RANK_DEFAULTS)
#: a constructor-only flag of presets whose rule is matrix-only (Muon, AuON): named embeddings/heads
#: go to the rule's fallback group (``lrgrad.optim.embedding_routing``)
EMBEDDING_FLAG = "adamw_for_embeddings"


def _conda_beta(lr: Any, options: dict[str, Any], defaults: Mapping[str, Any]) -> Any:
    """Conda's momentum is Adam's first moment: its β (``conda_beta``) is ``betas[0]`` unless given."""
    if options.get("conda_beta") is None:
        options["conda_beta"] = options.get("betas", defaults["betas"])[0]
    return lr


def _adafactor_kwargs(lr: Any, options: dict[str, Any], defaults: Mapping[str, Any]) -> Any:
    """``transformers.Adafactor``'s keywords (``decay_rate``, ``eps=(eps1, eps2)``, ...) in lrgrad's terms."""
    lr, eps, decay = translate_adafactor_kwargs(lr, options.get("eps", defaults["eps"]),
                                                options.get("beta2_decay", defaults["beta2_decay"]), options)
    options["eps"], options["beta2_decay"] = eps, decay
    return lr


@dataclass(frozen=True)
class Preset:
    """One row: what the named optimizer changes. ``None`` fields come from ``parent``."""

    name: str
    #: the row this one refines (its class is also the parent class); ``None``: ``LowRankOptimizer``
    parent: str | None = None
    rule: str | None = None
    projector: str | None = None
    #: ``projector=`` is a constructor keyword (the row's projector is its default)
    choose_projector: bool | None = None
    #: hyperparameters (``lr`` included) whose default differs from the rule's, the projector's or the base's
    defaults: Mapping[str, Any] = field(default_factory=dict)
    #: the names after ``params`` that may be given positionally (torch.optim's order for the family)
    positional: tuple[str, ...] | None = None
    #: short names (``lrgrad.ALIASES``); the experiments CLI and the estimator accept them too
    aliases: tuple[str, ...] = ()
    #: transformers' ``TrainingArguments.optim`` value that means this method (galore-torch's names):
    #: the Trainer integration then fills transformers' GaLore defaults, as transformers does
    hf_optim: str | None = None
    #: the paper's pretraining recipe the experiments CLI follows (``--recipe paper``): lr, scale, ...
    paper_recipe: Mapping[str, Any] | None = None
    #: a display name for result tables
    label: str = ""
    #: translates foreign keywords in place: ``(lr, options, defaults) -> lr``
    translate: Callable[[Any, dict[str, Any], Mapping[str, Any]], Any] | None = None
    doc: str = ""


# ---------------------------------------------------------------------- the table
PRESETS: tuple[Preset, ...] = (
    # -- one rule inside any projector (``projector=``)
    Preset("LowRankAdamW", rule="adamw", projector="svd", choose_projector=True,
           positional=("lr", "betas", "eps", "weight_decay"),
           doc='AdamW inside any projector: ``LowRankAdamW(params, projector="dct", rank=128)``.'),
    Preset("LowRankAdafactor", rule="adafactor", projector="svd", choose_projector=True,
           defaults={"lr": 1e-2, "weight_decay": 0.0},
           positional=("lr", "beta1", "beta2_decay", "eps", "clip_threshold", "weight_decay"),
           translate=_adafactor_kwargs,
           doc="""Adafactor (factored second moment) inside any projector.

    Also takes ``transformers.Adafactor``'s keywords (``decay_rate``, ``eps=(eps1, eps2)``,
    ``scale_parameter=False``, ``relative_step=False``, ``warmup_init=False``) with their
    meaning; the relative step and parameter scaling are refused with what to use instead
    (``lrgrad.optim.adafactor_compat``)."""),
    Preset("LowRankLion", rule="lion", projector="svd", choose_projector=True,
           defaults={"lr": 1e-4, "weight_decay": 0.0}, positional=("lr", "betas", "weight_decay"),
           doc="Lion inside any projector."),
    # -- GaLore: the SVD projector
    Preset("GaLoreAdamW", parent="LowRankAdamW", projector="svd", choose_projector=False,
           aliases=("galore", "galore_adamw"), hf_optim="galore_adamw", label="GaLore-AdamW",
           paper_recipe={"lr": 1e-2, "scale": 0.25},
           doc=r"""GaLore: AdamW on gradients projected onto their top-r SVD subspace.

    "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
    Zhao et al. 2024, arXiv:2403.03507.

    For a projected m x n matrix (right side shown; ``proj_type="std"`` picks the
    side so moments are max(m, n) x r):

    .. math::
        P_t &= V_{:r}^\top \text{ of } \mathrm{svd}(G_t) \text{ on steps } 1, T+1, 2T+1, \dots \\
        R_t &= G_t P_t^\top, \quad u_t = \mathrm{AdamW}(R_t) \\
        W_t &= W_{t-1}(1 - \eta\lambda) - \eta\,\alpha\, u_t P_t

    ``GaLoreAdamW(model.named_parameters(), rank=128)`` projects every block matrix whose
    smaller side exceeds 128; embeddings, the head and 1-D params run plain AdamW. Without
    ``rank`` a group runs full-rank (galore-torch's convention: only groups given a rank are
    projected). Defaults follow ``torch.optim.AdamW``; ``update_proj_gap=200`` follows the paper
    (pass ``scale=0.25`` for its α). The refresh (``svd="warm"``) is a subspace iteration from the
    previous basis (the first: from seeded Gaussian columns), with the exact Gram eigenvectors when
    it does not converge; ``svd="gram"``, ``"exact"`` (galore-torch's call) and ``"randomized"``
    choose otherwise."""),
    Preset("GaLoreAdafactor", parent="LowRankAdafactor", projector="svd", choose_projector=False,
           aliases=("galore_adafactor",), hf_optim="galore_adafactor", label="GaLore-Adafactor",
           paper_recipe={"lr": 1e-2, "scale": 0.25},
           doc="GaLore with Adafactor's factored second moment in the low-rank space (arXiv:2403.03507)."),
    # -- DCT: a shared DCT-II basis, r indices per matrix
    Preset("DCTAdamW", parent="LowRankAdamW", projector="dct", choose_projector=False,
           defaults={"moment_policy": "project"}, aliases=("dct", "dct_adamw"), label="DCT-AdamW",
           paper_recipe={"lr": 1e-2, "scale": 0.25},
           doc=r"""AdamW in the r DCT-II directions that carry most of the gradient.

    "SVD-Free Low-Rank Adaptive Gradient Optimization for Large Language Models", arXiv:2505.17967.

    .. math::
        \mathrm{idx}_t &= \mathrm{top}_r\ \text{column norms of } G_t Q \text{ on steps } 1, T+1, \dots
            \quad (Q: \text{shared orthonormal DCT-II basis}) \\
        R_t &= G_t Q_{:, \mathrm{idx}}, \quad u_t = \mathrm{AdamW}(R_t), \quad
        W_t = W_{t-1}(1 - \eta\lambda) - \eta\,\alpha\, u_t Q_{:, \mathrm{idx}}^\top

    The per-layer state is the moments plus r int32 indices; one basis per projected
    size is shared by all layers (``lrgrad.projectors.dct.dct_cached_bytes``).
    ``moment_policy="project"`` (default here): on a reselection each surviving basis
    vector keeps its moments and new ones start at zero - the moments never drift to
    another basis vector. ``dct_scores`` picks the scoring path (``"auto"``: FFT for
    large sizes, matmul otherwise; ``"sketch"``: left-side scores from a seeded rank-(r + 8)
    sketch, what FSDP2 runs by default). Under FSDP2 the left side (m < n) is scored from
    that sketch (``dct_sharded="sketch"``) instead of all-gathering G; ``dct_sharded="gather"``
    keeps exact scores."""),
    Preset("DCTAdafactor", parent="LowRankAdafactor", projector="dct", choose_projector=False,
           defaults={"moment_policy": "project"}, aliases=("dct_adafactor",),
           doc="Adafactor (factored second moment) in the DCT subspace (arXiv:2505.17967); see ``DCTAdamW``."),
    # -- GoLore: GaLore's SVD subspace for a warm-up, random orthonormal subspaces after it
    Preset("GoLoreAdamW", parent="LowRankAdamW", projector="golore", choose_projector=False,
           defaults={"moment_policy": "project"}, aliases=("golore", "golore_adamw"), label="GoLore-AdamW",
           paper_recipe={"lr": 1e-3, "scale": 1.0},  # the reference's pretraining script (pkumelon/Golore)
           doc=r"""GoLore: AdamW in random orthonormal subspaces after a GaLore warm-up.

    "Subspace Optimization for Large Language Models with Convergence Guarantees", He et al.,
    ICML 2025, arXiv:2410.11289 (docs/golore.md).

    .. math::
        P_t &= \begin{cases} \text{top-}r \text{ SVD basis of } G_t & t \le T_s \\
               \text{Haar-random orthonormal } r\text{-frame (seeded)} & t > T_s \end{cases}
               \text{ on steps } 1, T+1, \dots \\
        R_t &= G_t P_t^\top, \quad u_t = \mathrm{AdamW}(R_t), \quad
        W_t = W_{t-1}(1 - \eta\lambda) - \eta\,\alpha\, u_t P_t

    ``golore_switch`` = T_s (default 0: random from the start; the paper's runs switch at 80% of
    training). At a refresh the first moment is carried into the new subspace and the second kept
    (``moment_policy="project"``, ``golore_v_transfer="keep"``), as the reference does."""),
    # -- Conda: Adam's second moment in the basis of the momentum's SVD
    Preset("CondaAdamW", parent="LowRankAdamW", projector="conda", choose_projector=False,
           defaults={"moment_policy": "project", "update_proj_gap": 2000}, aliases=("conda", "conda_adamw"),
           label="Conda-AdamW", paper_recipe={"lr": 1e-3, "scale": 1.0}, translate=_conda_beta,
           doc=r"""Conda: Adam whose second moment lives in the orthonormal basis of the momentum's SVD.

    "Conda: Column-Normalized Adam for Training Large Language Models Faster", Wang et al. 2025
    (docs/conda.md; equal to ``pytorch_optimizer.Conda`` in float64).

    .. math::
        M_t &= \beta_1 M_{t-1} + (1-\beta_1) G_t, \quad P_t = \text{top-}r\text{ SVD basis of } M_t
              \text{ on steps } 1, T, 2T, \dots \\
        v_t &= \beta_2 v_{t-1} + (1-\beta_2) (G_t P_t^\top)^2, \quad
        W_t = W_{t-1}(1 - \eta\lambda) - \eta\,\alpha\,
              \frac{M_t P_t^\top / (1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon} P_t

    The momentum is full size (projector state); ``v`` is r-sized and kept in coordinates across
    refreshes. The reference keeps every singular vector; a ``rank`` below ``min(m, n)`` is lrgrad's
    memory-saving extension. ``update_proj_gap`` 2000 and the exact SVD as the reference."""),
    # -- LDAdam: a subspace per step, projection-aware moment transport, error feedback
    Preset("LDAdamW", parent="LowRankAdamW", projector="ldadam", choose_projector=False,
           defaults={"betas": (0.908, 0.99), "update_proj_gap": 1, "moment_policy": "project", "scale": 1.0,
                     "ldadam_error_feedback": True},
           aliases=("ldadam", "ldadamw"), label="LDAdamW", paper_recipe={"lr": 1e-3, "scale": 1.0},
           doc=r"""LDAdam: Adam from low-dimensional gradient statistics, with error feedback.

    "LDAdam: Adaptive Optimization from Low-Dimensional Gradient Statistics", Robert et al., ICLR 2025,
    arXiv:2410.16103 (docs/ldadam.md).

    Every step: the subspace is one block power iteration from the last, on
    :math:`B = \rho\,\mathrm{up}(m)/(1-\beta_1^{t-1}) + (1-\rho)\,\tilde G_t`, where
    :math:`\tilde G_t = G_t + e_{t-1}` carries the error fed back; Adam's moments are moved into it
    (m by :math:`T = P_{old} P_{new}^\top`, v's variance by :math:`T \circ T`, its mean exactly); the error
    :math:`e_t` is what the projection drops of :math:`\tilde G_t` plus what the transport drops of the
    momentum (times :math:`\beta_1/(1-\beta_1)`). Defaults as the reference: betas (0.908, 0.99),
    ``ldadam_rho`` 0.908, power iteration, error feedback on, α = 1."""),
    # -- Grass: r selected rows/columns, a gather and a scatter-add (no projection GEMM)
    Preset("GrassAdamW", parent="LowRankAdamW", projector="grass", choose_projector=False,
           defaults={"moment_policy": "reset"}, aliases=("grass", "grass_adamw"), label="Grass-AdamW",
           paper_recipe={"lr": 1e-2, "scale": 0.25},
           doc=r"""Grass: AdamW on r selected rows (or columns) of the gradient.

    "Grass: Compute Efficient Low-Memory LLM Training with Structured Sparse Gradients",
    Muhamed et al. 2024, arXiv:2406.17660 (docs/grass.md).

    .. math::
        \sigma_t &= \text{the } r \text{ coordinates of largest } \|G_{t,i}\|^2 \text{ (or sampled
            with } q_i \propto \|G_{t,i}\|^2\text{) on steps } 1, T+1, \dots \\
        R_t &= \rho\, G_t[\sigma_t, :], \quad u_t = \mathrm{AdamW}(R_t), \quad
        W_t = W_{t-1}(1 - \eta\lambda) - \eta\,\alpha\, \mathrm{scatter}_{\sigma_t}(\rho\, u_t)

    ``down`` is a gather and the update a scatter-add: no projection GEMM; the state per matrix is
    the two r-row moments and r int32 indices (+ r scales ρ when sampled). ``grass_select``:
    ``"top"`` (deterministic, ρ = 1), ``"norm"`` (Multinomial-Norm² with replacement,
    ρ_j = 1/sqrt(r q_j): unbiased), ``"uniform"``. The moments are reset at every reselection
    (the paper's choice); ``moment_policy="project"`` keeps those of the rows that stay."""),
    # -- Online Subspace Descent: the online-PCA projector
    Preset("OnlineSubspaceAdamW", parent="LowRankAdamW", projector="online_pca", choose_projector=False,
           defaults={"update_proj_gap": 1}, aliases=("online_subspace", "online_subspace_adamw"),
           label="OnlineSubspace-AdamW", paper_recipe={"lr": 1e-2, "scale": 0.25},
           doc=r"""Online Subspace Descent with AdamW.

    "Memory-Efficient LLM Training with Online Subspace Descent", Liang et al. 2024, arXiv:2408.12857.

    .. math::
        P_t &= P_{t-1} - \eta_P\,\mathrm{Adam}\big(\nabla_P \|\hat G_t P^\top P - \hat G_t\|_F^2\big),
            \quad \hat G_t = G_t / \|G_t\|_F, \quad \eta_P = \mathrm{pca\_lr}\cdot \eta_t/\eta_0 \\
        u_t &= \mathrm{AdamW}(G_t P_t^\top), \quad W_t = W_{t-1}(1 - \eta\lambda) - \eta\,\alpha\, u_t P_t

    ``P`` starts from the SVD of the first gradient (``pca_init="svd"``) or a random
    orthonormal matrix (``pca_init="random"``: no SVD ever) and then moves by one
    online-PCA step every ``update_proj_gap`` steps (default 1: every step), with a QR
    guard (``pca_qr_every``, ``pca_ortho_tol``). The moments stay in place across
    these small rotations (``moment_policy="keep"``, as the reference does)."""),
    Preset("OnlineSubspaceLion", parent="LowRankLion", projector="online_pca", choose_projector=False,
           defaults={"update_proj_gap": 1}, aliases=("online_subspace_lion",),
           doc="Online Subspace Descent with Lion (arXiv:2408.12857); see ``OnlineSubspaceAdamW``."),
    # -- 8-bit moments: GaLore with 8-bit Adam, Q-GaLore (INT4 basis, adaptive gap)
    Preset("GaLoreAdamW8bit", parent="LowRankAdamW", rule="adamw8bit", projector="svd", choose_projector=False,
           aliases=("galore8bit", "galore_adamw_8bit"), hf_optim="galore_adamw_8bit", label="GaLore-AdamW8bit",
           doc="""GaLore (fp32 SVD basis, fixed gap) with 8-bit blockwise Adam moments.

    "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
    Zhao et al. 2024, arXiv:2403.03507 (its "8-bit GaLore"), moments as in
    ``rule="adamw8bit"`` (arXiv:2110.02861)."""),
    Preset("QGaLoreAdamW", parent="LowRankAdamW", rule="adamw8bit", projector="qgalore", choose_projector=False,
           aliases=("qgalore", "qgalore_adamw"), label="Q-GaLore-AdamW", paper_recipe={"lr": 1e-2, "scale": 0.25},
           doc=r"""Q-GaLore: AdamW with 8-bit moments inside an INT4-quantized SVD subspace.

    "Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive Low-Rank
    Gradients", Zhang et al. 2024, arXiv:2407.08296. The INT8-weight part of Q-GaLore
    (stochastic rounding of quantized weights) lives with ``lrgrad.quantize_weights``.
    Per projected m x n matrix (right side shown):

    .. math::
        P_t &= Q_4\big(V_{:r}^\top(\mathrm{svd}(G_t))\big) \text{ refreshed every } T_\ell \text{ steps} \\
        R_t &= G_t\, \hat P_t^\top, \quad u_t = \mathrm{AdamW}_{8\text{bit}}(R_t) \\
        W_t &= W_{t-1}(1 - \eta\lambda) - \eta\,\alpha\, u_t \hat P_t

    where :math:`Q_4` stores the basis as packed INT4 codes with fp16 scale/zero
    per group of ``proj_quant_group_size`` and :math:`\hat P` is its dequantization.
    The per-layer gap :math:`T_\ell` starts at ``update_proj_gap`` and doubles
    (up to ``max_proj_gap``, default 8x) while the last ``adaptive_window``
    subspace overlaps ``‖P_{old} P_{new}^\top‖_F^2 / r`` stay ``≥ adaptive_threshold``;
    it halves again when the subspace moves. Adam moments of at least
    ``moment_min_size`` elements are stored blockwise 8-bit (``moment_block_size``);
    params outside the projector (embeddings, norms) use the same 8-bit AdamW.
    ``proj_bits=8`` stores INT8 codes; ``adaptive_gap=False`` keeps a fixed gap."""),
    # -- Flora: seeded random projections, never stored
    Preset("FloraAdamW", parent="LowRankAdamW", projector="random", choose_projector=False,
           defaults={"update_proj_gap": 1000, "moment_policy": "project"}, aliases=("flora", "flora_adamw"),
           label="Flora-AdamW", paper_recipe={"lr": 1e-2, "scale": 1.0},
           doc=r"""AdamW on Flora-compressed gradients.

    "Flora: Low-Rank Adapters Are Secretly Gradient Compressors", Hao, Cao & Mou 2024, arXiv:2402.03293.

    .. math::
        R_t = \mathrm{down}_{P}(G_t), \quad u_t = \mathrm{AdamW}(R_t), \quad
        W_t = W_{t-1}(1 - \eta\lambda) - \eta\,\alpha\,\mathrm{up}_{P}(u_t)

    ``P`` is a random matrix regenerated from the parameter's seed and resampled every
    κ = ``update_proj_gap`` steps (Flora's κ = 1000); ``seed`` makes the matrices reproducible on
    every DDP rank and after a resume. On a resample the first moment moves with
    ``m <- down_new(up_old(m))`` (``lrgrad.projectors.random``). The state holds the moments and a
    few ints per matrix - no basis. ``scale`` defaults to 1: Gaussian draws satisfy
    ``E[up(down(G))] = G`` (with ``random_basis="orthonormal"`` the expectation is ``(r/d) G``)."""),
    Preset("FloraAdafactor", parent="LowRankAdafactor", projector="random", choose_projector=False,
           defaults={"update_proj_gap": 1000, "moment_policy": "project"}, aliases=("flora_adafactor",),
           doc="""Adafactor on Flora-compressed gradients, as in Flora's reference (arXiv:2402.03293).

    Factored second moment in the compressed space; the first moment is off unless ``beta1``
    is set (then it is Flora's compressed momentum, carried across resamples by
    ``down_new(up_old(m))``)."""),
    # -- full-rank updates from low-rank statistics (lrgrad.optim.full_rank)
    Preset("APOLLOAdamW", parent="LowRankAdamW", projector="random", choose_projector=True,
           defaults={"full_rank": "apollo", "scale": 1.0}, aliases=("apollo", "apollo_adamw"), hf_optim="apollo_adamw",
           label="APOLLO-AdamW", paper_recipe={"lr": 1e-2, "scale": 1.0},
           doc=r"""APOLLO: the raw gradient scaled per channel by a low-rank AdamW's rescaling.

    "APOLLO: SGD-like Memory, AdamW-level Performance", Zhu et al. 2024, arXiv:2412.05270.
    For a projected m×n matrix with a seeded Gaussian projection ``P`` (entries N(0, 1/r),
    regenerated from a seed, never stored; resampled every ``update_proj_gap`` steps) and the
    channels along the non-projected axis:

    .. math::
        R_t = \mathrm{down}_P(G_t), \quad u_t = \mathrm{AdamW}(R_t), \quad
        s_c = \|u_{t,c}\| / (\|R_{t,c}\| + 10^{-8}) \\
        W_t = W_{t-1}(1 - \eta\lambda) - \eta\,\alpha\,\mathrm{lim}_\gamma(G_t \odot s)

    ``lim_γ`` is Fira's norm-growth limiter (γ = ``norm_growth_limit`` = 1.01). State per
    matrix: the two r-column moments and one limiter scalar. Moments are kept across resamples
    (``moment_policy="keep"``, as the reference). ``projector`` may be any lrgrad projector;
    the mechanism lives in ``lrgrad.optim.full_rank``."""),
    Preset("APOLLOMiniAdamW", parent="APOLLOAdamW",
           defaults={"rank": 1, "scale": APOLLO_MINI_SCALE, "scale_type": "tensor"},
           aliases=("apollo_mini", "apollo_mini_adamw"), label="APOLLO-Mini",
           paper_recipe={"lr": 1e-2, "scale": APOLLO_MINI_SCALE, "rank": 1},
           doc=r"""APOLLO-Mini: rank 1, one tensor-wise scale, α = √128 (arXiv:2412.05270).

    .. math::
        s = \|u_t\|_F / (\|R_t\|_F + 10^{-8}), \quad
        W_t = W_{t-1}(1 - \eta\lambda) - \eta\,\sqrt{128}\,\mathrm{lim}_\gamma(s\,G_t)

    State per projected matrix: 2·max(m, n) + 1 numbers (a rank-1 pair of moments and the limiter)."""),
    Preset("FiraAdamW", parent="LowRankAdamW", projector="svd", choose_projector=True,
           defaults={"full_rank": "fira", "scale": 0.25}, aliases=("fira", "fira_adamw"), label="Fira-AdamW",
           paper_recipe={"lr": 1e-2, "scale": 0.25},
           doc=r"""Fira: GaLore's update plus the out-of-subspace residual, scaled per channel.

    "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?", Chen et al. 2024,
    arXiv:2410.01623.

    .. math::
        R_t = G_t P_t^\top, \quad u_t = \mathrm{AdamW}(R_t), \quad
        \phi_c = \|u_{t,c}\| / (\|R_{t,c}\| + 10^{-8}) \\
        W_t = W_{t-1}(1 - \eta\lambda) - \eta\,\big(\alpha\, u_t P_t
              + \mathrm{lim}_\gamma\big((G_t - R_t P_t) \odot \phi\big)\big)

    ``P`` is GaLore's top-r SVD basis (``projector="svd"``; any lrgrad projector works); the
    residual is the part of ``G`` the subspace misses, and ``lim_γ`` (γ = 1.01) Fira's norm-growth
    limiter. State: GaLore's (moments + basis) and one limiter scalar per matrix."""),
    Preset("FRUGALAdamW", parent="LowRankAdamW", projector="svd", choose_projector=True,
           defaults={"full_rank": "frugal", "scale": 1.0, "norm_growth_limit": None},
           aliases=("frugal", "frugal_adamw"), label="FRUGAL-AdamW",
           paper_recipe={"lr": 1e-3, "scale": 1.0},  # the reference's scripts: lr 1e-3, both lr scales 1
           doc=r"""FRUGAL: AdamW in a subspace, state-free signSGD on the rest of the gradient.

    "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead for Scalable Training",
    Zmushko et al. 2025, arXiv:2412.07837 (docs/frugal.md).

    .. math::
        R_t = \mathrm{down}(G_t), \quad u_t = \mathrm{AdamW}(R_t) \\
        W_t = W_{t-1}(1 - \eta\lambda) - \eta\,\big(\alpha\,\mathrm{up}(u_t)
              + c\,\mathrm{sign}(G_t - \mathrm{up}(R_t))\big)

    ``projector`` is GaLore's SVD subspace by default (any lrgrad projector works: ``"random"``,
    ``"grass"``, ``"dct"``, ...); α = ``scale`` = 1 and c = ``frugal_lr_scale`` = 1 as the reference
    (its ``proj_params_lr_scale`` and ``inactive_lr_scale``). State: the rule's in the subspace and
    the projector's; the residual's update keeps none. No norm-growth limiter (FRUGAL has none)."""),
    # -- normalized momentum (matrix-only rules: 1-D params, named embeddings and heads get AdamW)
    Preset("AuON", rule="auon", projector="svd", choose_projector=True,
           defaults={"lr": 0.055, "weight_decay": 0.0, "scale": 1.0}, aliases=("auon",), label="AuON",
           positional=("lr", "momentum", "nesterov", "weight_decay", "eps", "rms_eps", "gamma",
                       "normalize_numerator"),
           paper_recipe={"lr": 0.055},
           doc=r"""AuON: normalized momentum with a cosh brake, O(mn) per matrix.

    "AuON: A Linear-time Alternative to Semi-Orthogonal Momentum Updates", arXiv:2509.24320.

    .. math::
        M_t &= \beta M_{t-1} + (1-\beta) G_t, \quad V_t = (1-\beta) G_t + \beta M_t \ \text{(Nesterov)} \\
        X_t &= V_t / (\lVert V_t\rVert_F + \epsilon), \quad
        \mathrm{rms}_t = \lVert\cosh(\gamma X_t)\rVert_F / \sqrt{N} \\
        W_t &= W_{t-1}(1-\eta\lambda) - \eta\, X_t / (\mathrm{rms}_t + \epsilon_{rms})

    Defaults follow the paper (lr 0.055, momentum 0.95, γ = 1, normalized numerator).
    ``gamma=1.5, normalize_numerator=False`` reproduce the public reference code's variant.
    1-D params get AdamW (``adamw_lr``, ``adamw_betas``, ...) in the same optimizer, and so do
    named embeddings/heads (``adamw_for_embeddings``; see ``lrgrad.optim.embedding_routing``).
    With ``rank=r`` the rule runs on the low-rank gradient inside ``projector``."""),
    Preset("HybridAuON", parent="AuON", rule="hybrid_auon", aliases=("hybrid_auon",), label="Hybrid-AuON",
           paper_recipe={"lr": 0.055},
           doc="""Hybrid-AuON: ``ns_steps`` quintic Newton–Schulz iterations, then AuON's cosh scaling
    (arXiv:2509.24320; one iteration by default, as in the paper). ``ns_dtype``: as Muon's."""),
    Preset("Muon", rule="muon", projector="svd", choose_projector=True,
           defaults={"lr": 0.02, "weight_decay": 0.0, "scale": 1.0}, aliases=("muon",), label="Muon",
           positional=("lr", "momentum", "nesterov", "weight_decay", "ns_steps"),
           paper_recipe={"lr": 1e-2},
           doc=r"""Muon: momentum orthogonalized by 5 quintic Newton–Schulz steps (Jordan et al. 2024).

    .. math::
        M_t = \beta M_{t-1} + (1-\beta) G_t, \quad V_t = (1-\beta) G_t + \beta M_t, \quad
        W_t = W_{t-1}(1-\eta\lambda) - \eta\,\sqrt{\max(1, m/n)}\ \mathrm{NS}_5(V_t)

    ``match_rms_adamw=True`` scales by ``0.2·sqrt(max(m, n))`` instead, so the update RMS matches
    AdamW's and AdamW's lr and weight decay carry over ("Muon is Scalable for LLM Training",
    arXiv:2502.16982). 1-D params, and named embeddings/heads (``adamw_for_embeddings``), get AdamW
    in the same optimizer. With ``rank=r`` the rule runs on the low-rank gradient.

    ``ns_dtype``: the precision of the Newton–Schulz iterates. ``"auto"`` (default): bf16, as Muon's
    reference and ``torch.optim.Muon``, where bf16 GEMMs are native (CUDA sm_80+, CPUs with
    AVX512-BF16/AMX or Arm BF16), fp32 where they are emulated; fp64 params stay fp64.
    ``"bf16"`` / ``"fp32"`` force one (``lrgrad.kernels.precision``; docs/normalized.md)."""),
    Preset("GaLoreMuon", parent="Muon", choose_projector=False, aliases=("galore_muon",),
           doc="""Muon on GaLore's top-r SVD subspace: r x n (or m x r) momentum, Newton–Schulz on the
    low-rank matrix (arXiv:2403.03507 × Jordan et al. 2024). ``rank`` projects every matrix
    whose smaller side exceeds it; smaller matrices run full-rank Muon, 1-D params AdamW."""),
    Preset("GaLoreAuON", parent="AuON", choose_projector=False, aliases=("galore_auon",),
           doc="""AuON on GaLore's top-r SVD subspace (arXiv:2509.24320 × arXiv:2403.03507): the momentum
    is low-rank and the normalization costs O(r·max(m, n))."""),
    Preset("DCTAuON", parent="AuON", projector="dct", choose_projector=False,
           defaults={"moment_policy": "project"}, aliases=("dct_auon",),
           doc="""AuON in the r DCT-II directions that carry most of the gradient (arXiv:2509.24320 ×
    arXiv:2505.17967): r x n (or m x r) momentum plus r int32 indices per matrix, no stored basis,
    and no matrix product in the update rule. ``moment_policy="project"``: on a reselection each
    surviving DCT direction keeps its momentum, new ones start at zero."""),
)


# ---------------------------------------------------------------------- resolving a row
@dataclass(frozen=True)
class ResolvedPreset:
    """A row with its parents' fields filled in, and every default it implies."""

    row: Preset
    rule: str
    projector: str
    choose_projector: bool
    positional: tuple[str, ...]
    #: what the row and its parents change (passed to ``LowRankOptimizer``)
    overrides: Mapping[str, Any]
    #: every constructor default: base, rule, projector (when fixed), then ``overrides``; ``lr`` included
    defaults: Mapping[str, Any]
    translate: Callable[[Any, dict[str, Any], Mapping[str, Any]], Any] | None

    @property
    def name(self) -> str:
        return self.row.name

    @property
    def full_rank(self) -> str | None:
        return self.defaults["full_rank"]

    @property
    def matrix_only(self) -> bool:
        """Whether the rule updates matrices only (1-D params and named embeddings take its fallback)."""
        return RULES[self.rule].matrix_only


_BY_NAME = {row.name: row for row in PRESETS}


def resolve(row: Preset) -> ResolvedPreset:
    """``row`` with every ``None`` field taken from its parent chain."""
    chain = [row]
    while chain[-1].parent is not None:
        parent = chain[-1].parent
        if parent not in _BY_NAME:
            raise ValueError(f"Invalid parent: preset {chain[-1].name!r} names {parent!r}, which is not a preset")
        chain.append(_BY_NAME[parent])

    def first(attr: str) -> Any:
        return next(getattr(r, attr) for r in chain if getattr(r, attr) is not None)

    overrides: dict[str, Any] = {}
    for r in reversed(chain):
        overrides.update(r.defaults)
    rule, projector, choose = first("rule"), first("projector"), first("choose_projector")
    defaults: dict[str, Any] = {"lr": BASE_LR, **BASE_DEFAULTS, **RULES[rule].option_defaults}
    if not choose:
        defaults.update(PROJECTORS[projector].option_defaults)
    defaults.update(overrides)
    translate = next((r.translate for r in chain if r.translate is not None), None)
    return ResolvedPreset(row, rule, projector, choose, first("positional"), MappingProxyType(overrides),
                          MappingProxyType(defaults), translate)


def preset(name: str) -> ResolvedPreset:
    """The resolved row of class name ``name``; ``ValueError`` listing the names."""
    if name not in _BY_NAME:
        raise ValueError(f"Invalid preset: {name!r}; expected one of {sorted(_BY_NAME)}")
    return resolve(_BY_NAME[name])


def preset_of(cls: type) -> ResolvedPreset | None:
    """The row ``cls`` was built from, or the nearest base class's (a hand-written subclass of a preset);
    ``None`` for ``LowRankOptimizer`` itself and classes outside the table."""
    return next((k.__dict__["preset"] for k in cls.__mro__ if "preset" in k.__dict__), None)


# ---------------------------------------------------------------------- the classes
def signature_of(p: ResolvedPreset) -> inspect.Signature:
    """``(self, params, <positional>, *, <every other hyperparameter>, **options)`` with defaults."""
    listed = ["lr", *p.positional[1:]]
    keyword = [k for k in HEADLINE_KEYS if k not in listed]
    if p.choose_projector:
        keyword.append("projector")
    keyword += [k for k in p.overrides if k not in FULL_RANK_KEYS]
    keyword += list(RULES[p.rule].option_defaults)
    if not p.choose_projector:
        keyword += list(PROJECTORS[p.projector].option_defaults)
    if p.full_rank is not None:
        keyword += list(FULL_RANK_KEYS)
    keyword += [k for k in BASE_DEFAULTS if k not in FULL_RANK_KEYS]
    if p.matrix_only:
        keyword.append(EMBEDDING_FLAG)
    defaults = {**p.defaults, "projector": p.projector, EMBEDDING_FLAG: True}
    keyword = [k for k in dict.fromkeys(keyword) if k not in listed]
    kind = inspect.Parameter
    params = [kind("self", kind.POSITIONAL_OR_KEYWORD), kind("params", kind.POSITIONAL_OR_KEYWORD)]
    params += [kind(k, kind.POSITIONAL_OR_KEYWORD, default=defaults[k]) for k in listed]
    params += [kind(k, kind.KEYWORD_ONLY, default=defaults[k]) for k in keyword]
    params.append(kind("options", kind.VAR_KEYWORD))
    return inspect.Signature(params)


def _refuse_fixed(p: ResolvedPreset, given: Mapping[str, Any]) -> None:
    fixed = {"rule": p.rule} if p.choose_projector else {"rule": p.rule, "projector": p.projector}
    for key, value in fixed.items():
        if key in given:
            generic = "LowRankOptimizer" if key == "rule" else next(
                (r.name for r in PRESETS if r.choose_projector and r.parent is None and r.rule == p.rule),
                "LowRankOptimizer")
            raise TypeError(f"Invalid {key}: {p.name} fixes {key}={value!r}; for {key}={given[key]!r} use "
                            f"lrgrad.{generic}(params, {key}={given[key]!r}, ...)")


def construct(self: LowRankOptimizer, p: ResolvedPreset, params: ParamsT, given: dict[str, Any]) -> None:
    """Build ``self`` as preset ``p`` with the arguments the caller ``given`` (defaults not filled in:
    ``LowRankOptimizer`` fills them, and knows which options were explicit)."""
    _refuse_fixed(p, given)
    refuse_module(params)  # before the embedding routing iterates it
    projector = given.pop("projector", p.projector)
    lr = given.pop("lr", p.defaults["lr"])
    options = {**p.overrides, **given}
    options.pop("lr", None)
    if p.translate is not None:
        lr = p.translate(lr, options, p.defaults)
    if p.matrix_only:
        route = options.pop(EMBEDDING_FLAG, True)
        check_bool(EMBEDDING_FLAG, route)
        if route:  # the fallback is derived from the lr and the rule's options: check them first
            check_lr(lr)
            RULES[p.rule].validate_options({**p.defaults, **options})
            params = route_embeddings_to_adamw(params, _fallback_keys(p, lr, options))
    rankless_groups = _rankless_groups(params) and options.get("rank") is None
    LowRankOptimizer.__init__(self, params, lr, rule=p.rule, projector=projector, **options)
    if rankless_groups and not (p.matrix_only and p.choose_projector):
        # Muon, AuON and Hybrid-AuON are full-rank by default: only the low-rank presets have something to say
        warnings.warn(
            f"{p.name}: none of the param groups given has a rank (and the constructor got none), so nothing is "
            f"projected: every param steps full-rank, at full-rank {p.rule}'s memory. Give the groups to project "
            "a 'rank', or pass rank=r; with the Trainer, build lrgrad.integrations.transformers."
            "optimizer_cls_and_kwargs(model, args) for each Trainer (the Trainer takes 'params' out of the dict it "
            "is given, and a second Trainer built from it passes its own groups)",
            UserWarning, stacklevel=caller_stacklevel())


def _rankless_groups(params: Any) -> bool:
    """Param groups (dicts) of which none sets a rank: the Trainer's own decay / no-decay groups, or galore-torch
    style groups that forgot the rank. ``model.parameters()`` or a list of tensors without a rank is full-rank by
    request (galore-torch's convention) and stays silent."""
    return (isinstance(params, (list, tuple)) and len(params) > 0 and all(isinstance(g, dict) for g in params)
            and all(g.get("rank") is None for g in params))


def _fallback_keys(p: ResolvedPreset, lr: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """The keys a group of the matrix-only rule's fallback (``fallback_group``) changes: its rule, lr,
    betas, eps (and weight decay when ``adamw_weight_decay`` is set)."""
    group = {**p.defaults, **options, "lr": lr}
    fallback = RULES[p.rule].fallback_group(group)
    return {k: v for k, v in fallback.items() if k == "rule" or k not in group or group[k] != v}


def build_preset_class(p: ResolvedPreset, base: type[LowRankOptimizer]) -> type[LowRankOptimizer]:
    """The class of preset ``p``: a subclass of ``base`` whose ``__init__`` binds ``signature_of(p)``."""
    signature = signature_of(p)

    def __init__(self: LowRankOptimizer, params: ParamsT, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, params, *args, **kwargs)
        given = dict(bound.arguments)
        del given["self"]
        params = given.pop("params")
        given.update(given.pop("options", {}))
        construct(self, p, params, given)

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    __init__.__qualname__ = f"{p.name}.__init__"
    doc = inspect.cleandoc(p.row.doc) + "\n\n" + describe(p)
    cls = type(p.name, (base,), {"__init__": __init__, "__doc__": doc, "__module__": __name__, "preset": p})
    return cls


def describe(p: ResolvedPreset) -> str:
    """The generated part of a preset's docstring: its composition and the defaults it changes."""
    projector = f"projector={p.projector!r}" + (" (any, by ``projector=``)" if p.choose_projector else "")
    changed = ", ".join(f"{k}={v!r}" for k, v in p.overrides.items()) or "none"
    return (f"Preset of ``LowRankOptimizer``: rule={p.rule!r}, {projector}, full_rank={p.full_rank!r}; "
            f"defaults it changes: {changed} (``lrgrad.optim.presets``).")


def _build_all() -> dict[str, type[LowRankOptimizer]]:
    classes: dict[str, type[LowRankOptimizer]] = {}
    for row in PRESETS:
        base = LowRankOptimizer if row.parent is None else classes[row.parent]
        classes[row.name] = register_optimizer(*row.aliases)(build_preset_class(resolve(row), base))
    return classes


CLASSES = _build_all()

LowRankAdamW = CLASSES["LowRankAdamW"]
LowRankAdafactor = CLASSES["LowRankAdafactor"]
LowRankLion = CLASSES["LowRankLion"]
GaLoreAdamW = CLASSES["GaLoreAdamW"]
GaLoreAdafactor = CLASSES["GaLoreAdafactor"]
GaLoreAdamW8bit = CLASSES["GaLoreAdamW8bit"]
QGaLoreAdamW = CLASSES["QGaLoreAdamW"]
DCTAdamW = CLASSES["DCTAdamW"]
DCTAdafactor = CLASSES["DCTAdafactor"]
GrassAdamW = CLASSES["GrassAdamW"]
CondaAdamW = CLASSES["CondaAdamW"]
LDAdamW = CLASSES["LDAdamW"]
GoLoreAdamW = CLASSES["GoLoreAdamW"]
OnlineSubspaceAdamW = CLASSES["OnlineSubspaceAdamW"]
OnlineSubspaceLion = CLASSES["OnlineSubspaceLion"]
FloraAdamW = CLASSES["FloraAdamW"]
FloraAdafactor = CLASSES["FloraAdafactor"]
APOLLOAdamW = CLASSES["APOLLOAdamW"]
APOLLOMiniAdamW = CLASSES["APOLLOMiniAdamW"]
FiraAdamW = CLASSES["FiraAdamW"]
FRUGALAdamW = CLASSES["FRUGALAdamW"]
AuON = CLASSES["AuON"]
HybridAuON = CLASSES["HybridAuON"]
Muon = CLASSES["Muon"]
GaLoreMuon = CLASSES["GaLoreMuon"]
GaLoreAuON = CLASSES["GaLoreAuON"]
DCTAuON = CLASSES["DCTAuON"]

__all__ = ["APOLLO_MINI_SCALE", "CLASSES", "PRESETS", "Preset", "ResolvedPreset", "construct", "preset",
           "preset_of", "resolve", "signature_of", *CLASSES]
