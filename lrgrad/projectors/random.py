"""Flora's projector: a random matrix regenerated from a seed, never stored.

"Flora: Low-Rank Adapters Are Secretly Gradient Compressors",
Hao, Cao & Mou 2024, arXiv:2402.03293.

Flora compresses a gradient with a random Gaussian matrix whose entries are
N(0, 1/r): for m < n it keeps ``C = P G`` (P is r x m) and decompresses with
``Pᵀ C``, otherwise ``C = G P`` (P is n x r) and ``C Pᵀ``; ``E[P Pᵀ] = I`` (resp.
``E[Pᵀ P] = I``), so the decompressed gradient is an unbiased estimate of ``G``.
In lrgrad's side convention our ``P`` is Flora's transposed:

* ``"right"``: ``P`` is r x n, ``R = G Pᵀ``, ``up(U) = U P``, ``E[Pᵀ P] = I_n``;
* ``"left"``:  ``P`` is m x r, ``R = Pᵀ G``, ``up(U) = P U``, ``E[P Pᵀ] = I_m``.

``random_basis="orthonormal"`` uses the Q factor of the same Gaussian draw (sign
fixed by ``diag(R) > 0``, so Q is unique and Haar distributed): rows (right) /
columns (left) are orthonormal and ``up(down(G))`` is an orthogonal projection
(``E[up(down(G))] = (r / d) G`` instead of ``G``).

The matrix is a pure function of ``(proj_seed, draw, shape, kind, dtype, device type)``:
the per-parameter state holds only ``proj_seed`` (set by the optimizer from the
group's ``seed`` and the parameter's construction index), ``proj_refreshes`` (the
draw counter: draw ``k`` is the k-th matrix) and ``proj_dim`` (the length of the
projected axis). Every DDP rank and every resumed run regenerates the same matrix.
The matrix for the *next* step is known before its gradient exists
(``draw_for_step``), which is what makes Flora's compressed gradient accumulation
possible (``lrgrad.accumulation.CompressedAccumulator``).

Generators: ``random_device="param"`` (default) draws with a ``torch.Generator`` on
the parameter's device - fast, and identical across ranks and resumes on the same
kind of hardware. CUDA's generator output depends on the GPU's multiprocessor
count, so a checkpoint resumed on a *different GPU model* (or on the CPU) would
regenerate different matrices; ``random_device="cpu"`` draws on the CPU and copies
to the device, which gives the same matrix everywhere at the cost of a CPU draw
and a host-to-device copy per use.

Moments across a resample (``moment_policy="project"``, the Flora presets' default):

* linear moments (first moment ``m``): Flora's transfer ``m <- down_new(up_old(m))``;
* second moments (Adam's ``v``, Adafactor's factor along the projected axis),
  ``random_v_transfer``:

  - ``"mean"`` replaces them by their mean over the projected axis. A compressed
    coordinate is ``g·p_j`` with ``p_j`` drawn independently of the gradient, so
    ``E[(g·p_j)²] = c ‖g‖²`` is the same for every coordinate of a row, in the old
    draw and in the new one: the old coordinates are samples of the very quantity
    the new ones estimate, and their mean is the lowest-variance estimate of the
    new gradient coordinates' second moment. It keeps Adam's bias correction valid
    (a linear map of ``v``; a reset would not).
  - ``"quadratic"`` applies the generic ``T∘T``.
  - ``"auto"`` (default): ``"quadratic"`` for Gaussian draws, ``"mean"`` for
    orthonormal ones - the choice that never enlarges the step at a resample.
    Flora's transfer is expansive for Gaussian draws: ``E‖down_new(up_old(m))‖² =
    (d/r)‖m‖²`` (the up-projection's noise lands in the new coordinates). With
    ``"mean"`` the Adam step right after a resample is then ~``sqrt(d/r)`` too large
    for ~1/(1-β1) steps, and the momentum grows geometrically when
    ``(d/r)·β1^(2κ) > 1`` (κ = update_proj_gap; e.g. κ ≤ 6 at d/r = 4, β1 = 0.9):
    measured on the tiny test model with κ = 3 it diverges, while ``T∘T`` inflates
    ``v`` by the same d/r and keeps ``m/sqrt(v)`` in scale (steps are smaller until
    ``v`` forgets). For orthonormal draws the transfer is contractive
    (``(r/d)‖m‖²``) and ``T∘T`` would shrink ``v`` by r/d, so ``"mean"`` is the
    safe choice there.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from lrgrad import kernels
from lrgrad._checks import check_choice
from lrgrad.projectors.base import Projector
from lrgrad.subspace import state_like

RANDOM_BASES = ("gaussian", "orthonormal")
RANDOM_DEVICES = ("param", "cpu")
RANDOM_V_TRANSFERS = ("auto", "mean", "quadratic")

_MASK64 = (1 << 64) - 1

# Generated matrices of the last few uses, so down() and the update of one step
# (and old/new in a transition) draw once. Not optimizer state: never saved.
_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_CACHE_SIZE = 2


def clear_cache() -> None:
    """Drop the generated matrices kept for reuse within a step."""
    _CACHE.clear()


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def matrix_seed(proj_seed: int, draw: int) -> int:
    """Seed of the ``draw``-th matrix of a parameter: a hash of (proj_seed, draw).

    Hashing (rather than ``proj_seed + draw``) keeps draws of neighbouring
    parameters from sharing generator streams.
    """
    return _splitmix64(_splitmix64(int(proj_seed)) ^ int(draw)) & ((1 << 63) - 1)


def random_matrix(
    seed: int,
    rank: int,
    dim: int,
    side: str,
    kind: str = "gaussian",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    generator_device: torch.device | str | None = None,
) -> torch.Tensor:
    """The basis for ``seed``: r x dim (``side="right"``) or dim x r (``"left"``).

    ``kind="gaussian"``: i.i.d. N(0, 1/r). ``kind="orthonormal"``: Q of the QR of the
    dim x r standard Gaussian, with ``diag(R) > 0``. Drawn with a generator on
    ``generator_device`` (default: ``device``) and moved to ``device``.
    """
    gen_device = torch.device(device if generator_device is None else generator_device)
    generator = torch.Generator(device=gen_device)
    generator.manual_seed(seed)
    # Drawn in fp32 whatever ``dtype``: the subspace is a function of the seed alone, so a state
    # whose compute dtype cannot be read back (fp64 params with 8-bit moments hold only int8 codes
    # and fp32 block maxima) still regenerates the matrix its gradients were projected with.
    draw = torch.randn(dim, rank, generator=generator, device=gen_device, dtype=torch.float32).to(dtype)
    if kind == "gaussian":
        draw.mul_(rank ** -0.5)
    elif kind == "orthonormal":
        q, r = torch.linalg.qr(draw)
        signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(dtype)
        draw = q * signs  # unique (Haar) Q: independent of the LAPACK/cuSOLVER sign convention
    else:
        raise ValueError(f"Invalid random_basis: {kind!r}; expected one of {RANDOM_BASES}")
    # right: the transposed view, not a copy (BLAS reads either layout; a copy cost ~3% of a Flora step)
    basis = draw.T if side == "right" else draw
    return basis.to(device=device)


class RandomProjector(Projector):
    """Flora's seeded random projection, resampled every ``update_proj_gap`` steps."""

    name = "random"
    orthonormal = False  # True only with random_basis="orthonormal"
    #: the subspace never depends on the gradient: the next basis is known in advance
    gradient_free = True
    structural_state_keys = ("proj_dim",)
    option_defaults: dict[str, Any] = {
        "random_basis": "gaussian",
        "random_device": "param",
        "random_v_transfer": "auto",
    }

    @classmethod
    def validate_options(cls, group: dict[str, Any]) -> None:
        for key, allowed in (("random_basis", RANDOM_BASES), ("random_device", RANDOM_DEVICES),
                             ("random_v_transfer", RANDOM_V_TRANSFERS)):
            check_choice(key, group[key], allowed)

    def refresh_state_spec(
        self, shape2d: tuple[int, int], dtype: torch.dtype
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Nothing: the matrix is regenerated from ``proj_seed``."""
        return {}

    # ---------------------------------------------------------------- lifecycle
    def init_state(self, state: dict[str, Any], shape2d: tuple[int, int], seed: int) -> None:
        super().init_state(state, shape2d, seed)
        m, n = shape2d
        state["proj_dim"] = n if self.side == "right" else m

    def has_basis(self, state: dict[str, Any]) -> bool:
        return state.get("proj_refreshes", 0) > 0

    def default_scale(self, shape2d: tuple[int, int]) -> float:
        """1 for Gaussian draws: entries N(0, 1/r) make ``up`` of a unit-RMS low-rank update
        unit-RMS already (and ``E[up(down(G))] = G``); orthonormal draws need sqrt(d/r) like any
        orthonormal basis."""
        if self.options["random_basis"] == "gaussian":
            return 1.0
        return super().default_scale(shape2d)

    def refresh(self, state: dict[str, Any], grad: torch.Tensor | None, step: int, group: dict[str, Any]) -> bool:
        """Move to the next draw. The gradient is not read (it may be ``None``)."""
        state["proj_refreshes"] += 1
        return True

    def draw_for_step(self, state: dict[str, Any], step: int) -> int:
        """The draw that ``step`` (1-based) will project with, known before its gradient."""
        refreshes = state["proj_refreshes"]
        return refreshes + 1 if self.should_refresh(state, step) else refreshes

    # ---------------------------------------------------------------- the matrix
    def matrix(
        self, state: dict[str, Any], device: torch.device, dtype: torch.dtype, draw: int | None = None
    ) -> torch.Tensor:
        """Regenerate the basis of ``draw`` (default: the current one). Treat as read-only."""
        draw = state["proj_refreshes"] if draw is None else draw
        if draw < 1:
            raise RuntimeError("RandomProjector: no matrix drawn yet (refresh() has not run)")
        device = torch.device(device)
        kind = self.options["random_basis"]
        gen_device = device if self.options["random_device"] == "param" else torch.device("cpu")
        seed = matrix_seed(state["proj_seed"], draw)
        key = (seed, self.rank, state["proj_dim"], self.side, kind, dtype, str(gen_device), str(device))
        return self.memo(key, lambda: self._cached_matrix(key, seed, state["proj_dim"], kind, dtype, device,
                                                          gen_device))

    def _cached_matrix(self, key: tuple, seed: int, dim: int, kind: str, dtype: torch.dtype, device: torch.device,
                       gen_device: torch.device) -> torch.Tensor:
        cached = _CACHE.get(key)
        if cached is not None:
            _CACHE.move_to_end(key)
            return cached
        basis = random_matrix(seed, self.rank, dim, self.side, kind, dtype, device, gen_device)
        _CACHE[key] = basis
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
        return basis

    def basis(self, state: dict[str, Any]) -> torch.Tensor:
        like = state_like(state)
        device, dtype = like.device, like.dtype
        return self.matrix(state, device, dtype)

    def basis_like(self, state: dict[str, Any], like: torch.Tensor) -> torch.Tensor:
        return self.matrix(state, like.device, like.dtype)

    def down(self, state: dict[str, Any], grad: torch.Tensor, draw: int | None = None) -> torch.Tensor:
        return kernels.project_down(grad, self.matrix(state, grad.device, grad.dtype, draw), self.side)

    def up(self, state: dict[str, Any], update: torch.Tensor) -> torch.Tensor:
        return kernels.project_up(update, self.matrix(state, update.device, update.dtype), self.side)

    def update_param_(
        self, state: dict[str, Any], param2d: torch.Tensor, update: torch.Tensor, alpha: float, decay: float
    ) -> None:
        basis = self.matrix(state, update.device, update.dtype)
        kernels.lowrank_update_(param2d, update, basis, self.side, alpha=alpha, decay=decay)

    def transition(self, old_state: dict[str, Any], new_state: dict[str, Any]) -> torch.Tensor:
        """``down_new(up_old(·))`` as an r x r matrix, both draws regenerated from their seeds."""
        like = state_like(new_state)
        device, dtype = like.device, like.dtype
        p_old = self.matrix(old_state, device, dtype)
        p_new = self.matrix(new_state, device, dtype)
        return p_old @ p_new.T if self.side == "right" else p_new.T @ p_old

    def carry_moments(self, rule: Any, state: dict[str, Any], old_state: dict[str, Any]) -> None:
        """Linear moments: ``down_new(up_old(m))``; second moments: see the module docstring."""
        transition = self.transition(old_state, state)
        policy = self.options["random_v_transfer"]
        if policy == "auto":  # the one that never enlarges the step at a resample
            policy = "quadratic" if self.options["random_basis"] == "gaussian" else "mean"
        if policy == "quadratic":
            rule.change_basis(state, transition, self.side)
            return
        linear = dict(state)
        rule.change_basis(linear, transition, self.side)
        # T = 11ᵀ/√r gives T∘T = 11ᵀ/r: every second-moment coordinate becomes its mean
        # over the projected axis, whatever the rule's layout (full v or a factor).
        averaged = dict(state)
        rule.change_basis(averaged, torch.full_like(transition, self.rank ** -0.5), self.side)
        for key, value in list(state.items()):
            if key in rule.linear_keys:
                state[key] = linear[key]
            elif averaged[key] is not value:
                state[key] = averaged[key]
