"""The projector protocol: the subspace an update rule runs in.

A projector owns one decision and three maps for a single 2-D gradient ``G``
(m x n, N-d parameters are viewed as ``(shape[0], -1)``):

* ``should_refresh`` / ``refresh`` - when and how the subspace is recomputed;
* ``down`` - full gradient -> low-rank coordinates ``R``;
* ``up``   - low-rank update -> full shape (the optimizer multiplies by ``scale``);
* ``transition`` - the r x r change of coordinates between two subspaces, used
  to carry optimizer moments across a refresh (``moment_policy="project"``);
* ``corrected_grad`` / ``advance`` (optional) - state moved by the step's gradient (Conda's
  momentum, LDAdam's error buffer): the optimizer calls them once per step, before the refresh
  and after ``down``; their m x n tensors (``row_state_keys``) are row-sharded under FSDP2.

Projector objects are stateless strategies built from a param group. Everything
that must survive a checkpoint lives in the per-parameter ``state`` dict under
keys that start with ``proj_`` and is tensors or plain numbers only, so
``torch.load(..., weights_only=True)`` restores it exactly.

Side convention (shared by every projector and by ``lrgrad.kernels``):

* ``"right"``: ``P`` is r x n, ``R = G Pᵀ`` (m x r), ``up(U) = U P``.
* ``"left"``:  ``P`` is m x r, ``R = Pᵀ G`` (r x n), ``up(U) = P U``.

``proj_type="std"`` projects the smaller side so moments are max(m, n) x r.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from lrgrad import kernels
from lrgrad.dtensor import grad_code
from lrgrad.subspace import basis_shape


class Projector:
    """Base class: a dense basis ``P`` stored in ``state["proj_basis"]``.

    Subclasses override ``refresh`` (and ``basis``/``down``/``up`` when their
    basis is implicit, e.g. DCT indices or a Flora seed).
    """

    name: ClassVar[str] = "base"
    #: whether ``P`` has orthonormal rows (right) / columns (left)
    orthonormal: ClassVar[bool] = True
    #: projector-specific hyperparameters with their defaults; they live in the param group
    option_defaults: ClassVar[dict[str, Any]] = {}
    #: int state entries fixed by the parameter's shape (``load_state_dict`` requires them equal)
    structural_state_keys: ClassVar[tuple[str, ...]] = ()
    #: plain-number state entries a refresh adds beyond :meth:`init_state` (tensors are in
    #: :meth:`refresh_state_spec`); ``load_state_dict`` refuses any other key it does not know
    refresh_plain_keys: ClassVar[tuple[str, ...]] = ()
    #: the subspace never depends on the gradient (Flora's seeded draws): ``refresh`` accepts
    #: ``grad=None`` and :meth:`draw_for_step` names the next subspace before its gradient exists,
    #: which is what compressed accumulation (``lrgrad.CompressedAccumulator``) needs
    gradient_free: ClassVar[bool] = False
    #: the one-process options that compute what the default FSDP2 refresh (:meth:`refresh_sharded`)
    #: computes, e.g. the seeded sketch instead of an exact SVD: what tests and comparisons set to
    #: hold a sharded run equal to a one-process run
    sharded_refresh_options: ClassVar[dict[str, Any]] = {}
    #: False for a projector that cannot run on FSDP2 row shards (e.g. a third-party one whose state
    #: needs G whole every step): FSDP2 refuses its params with a ``ValueError`` before the step writes
    #: anything (``LowRankOptimizer.check_projectable``, ``ShardedProjector``). Every built-in one runs
    supports_sharding: ClassVar[bool] = True
    #: state entries shaped like the gradient (m x n) that :meth:`advance` moves forward row by row
    #: (Conda's momentum, LDAdam's error buffer). Under FSDP2 each is a ``Shard(0)`` DTensor laid out
    #: like the weight (so distributed checkpoints shard it), and the hooks (:meth:`corrected_grad`,
    #: :meth:`refresh_sharded`, :meth:`carry_moments`, :meth:`advance`) see this rank's rows of it
    row_state_keys: ClassVar[tuple[str, ...]] = ()
    #: every entry of G reaches ``down(G)`` (a dense basis): a NaN/Inf in G shows in the low-rank
    #: gradient, so ``skip_nonfinite`` checks only that small tensor. False for a selection (Grass's
    #: gather drops the unselected rows): the skip check then reads the whole gradient
    down_reads_every_entry: ClassVar[bool] = True

    def __init__(self, rank: int, update_proj_gap: int, side: str, options: dict[str, Any]):
        self.rank = rank
        self.update_proj_gap = update_proj_gap
        self.side = side
        self.options = options
        #: set by the optimizer for one group's step: a list where a refresh may leave the part of
        #: its work that batches across params (e.g. online PCA's small r x r steps), for
        #: :meth:`finish_deferred` to run once every param of the group has been projected; None:
        #: the refresh does all its work at once (per-layer updates, accumulation, FSDP2)
        self.deferred: list | None = None
        #: set by the FSDP2 wrapper (``lrgrad.projectors.sharded``): this param's
        #: :class:`lrgrad.dtensor.ShardContext` - the rows of G this rank holds and the collectives
        #: over them - while the hooks run on local rows; None in one process (every row is local)
        self.shard_ctx: Any = None

    @classmethod
    def compat_options(cls, group: Mapping[str, Any]) -> dict[str, Any]:
        """Options that make a param group written for another library's implementation of this
        projector run as it does there (set unless the group or the constructor sets them; e.g. an
        SVD group with galore-torch's four keys gets its exact SVD). Default: none."""
        return {}

    @classmethod
    def finish_deferred(cls, items: list) -> None:
        """Complete the refreshes that projectors of this class left in their ``deferred`` list during
        one step (every item was appended by an instance of ``cls``). The optimizer calls it after the
        group's last projection and before anything reads the new bases (the skip check, the updates)."""
        if items:
            raise NotImplementedError(f"{cls.__name__} deferred work but does not finish it")

    # ---------------------------------------------------------------- validation
    @classmethod
    def validate_options(cls, group: dict[str, Any]) -> None:
        """Raise ``ValueError``/``TypeError`` for bad projector options in ``group``."""

    # ---------------------------------------------------------------- lifecycle
    def init_state(self, state: dict[str, Any], shape2d: tuple[int, int], seed: int) -> None:
        """Create the projector's entries in a fresh per-parameter state."""
        state["proj_refreshes"] = 0
        state["proj_failures"] = 0
        state["proj_seed"] = int(seed)

    def has_basis(self, state: dict[str, Any]) -> bool:
        return "proj_basis" in state

    def previous_basis(self, state: dict[str, Any]) -> torch.Tensor | None:
        """The dense basis a refresh warm-starts from: ``None`` before the first refresh, and while the
        basis is provisional (computed from a zero gradient, it holds nothing to start from)."""
        return None if self.lacks_subspace(state) else self.basis(state)

    def lacks_subspace(self, state: dict[str, Any]) -> bool:
        """No basis, or only a provisional one: a basis in place that no refresh has counted
        (``proj_refreshes == 0``), because the first refresh saw a gradient that was zero everywhere
        (:func:`guarded_basis`) and the basis only gives the step its shapes. Every schedule refreshes on the
        next step; that refresh warm-starts from nothing (:meth:`previous_basis`) and carries no moments."""
        return not self.has_basis(state) or state.get("proj_refreshes", 0) == 0

    @staticmethod
    def refresh_generator(state: dict[str, Any], step: int, device: torch.device) -> torch.Generator:
        """A generator seeded from (param seed, step): the same draws on every rank and after a resume."""
        generator = torch.Generator(device=device)
        generator.manual_seed((state["proj_seed"] * 1_000_003 + step) % (2**63 - 1))
        return generator

    def should_refresh(self, state: dict[str, Any], step: int) -> bool:
        """Refresh on steps 1, gap+1, 2*gap+1, ... (1-based, as galore-torch does), and on every step
        while there is no basis or only a provisional one (:meth:`lacks_subspace`)."""
        return self.lacks_subspace(state) or (step - 1) % self.update_proj_gap == 0

    def refresh(self, state: dict[str, Any], grad: torch.Tensor, step: int, group: dict[str, Any]) -> bool:
        """Recompute the subspace from ``grad``; return True when the basis changed.

        Every refresh that puts a subspace in place adds 1 to ``state["proj_refreshes"]`` (a deferred one
        when it completes): a count of 0 says there is none yet (:meth:`lacks_subspace`), so every step
        refreshes until one counts, and an expert saved before its first counted refresh is saved as
        placeholders. A provisional basis (:func:`guarded_basis`: from a zero gradient) is stored
        uncounted and returns False.

        Implementations must *assign new tensors* (never write into the old
        basis in place) so a shallow copy of ``state`` taken before the call still
        describes the old subspace for ``transition``.
        """
        raise NotImplementedError

    def refresh_sharded(self, state: dict[str, Any], grad_local: torch.Tensor, step: int,
                        group: dict[str, Any], ctx: Any) -> Any:
        """FSDP2 hook: refresh from this rank's row shard ``grad_local`` of G, using the
        collectives of ``ctx`` (a :class:`lrgrad.dtensor.ShardContext`), so every rank ends
        with the same subspace. Return ``NotImplemented`` (the default) to have the
        gradient all-gathered and :meth:`refresh` called on it instead."""
        return NotImplemented

    # ---------------------------------------------------------------- the step's gradient
    def corrected_grad(self, state: dict[str, Any], grad: torch.Tensor) -> torch.Tensor:
        """The matrix this step works on: ``grad`` itself (the default), or ``grad`` corrected by
        projector state (LDAdam's ``G + e``, error feedback). The optimizer calls it once per step,
        before the refresh; the refresh, :meth:`down` and :meth:`advance` all receive what it returns.
        Row-local (row i of the result reads row i of ``grad`` and of :attr:`row_state_keys` only):
        under FSDP2 it runs on this rank's rows. Return a new tensor; never write ``grad``."""
        return grad

    def advance(self, state: dict[str, Any], grad: torch.Tensor, low: torch.Tensor) -> None:
        """Move full-size state (:attr:`row_state_keys`) forward with this step's gradient: the
        optimizer calls it once per step taken, after :meth:`down`, with ``grad`` (what
        :meth:`corrected_grad` returned) and ``low = down(grad)``. Under FSDP2 ``grad`` is this
        rank's rows ``[shard_ctx.row_offset, shard_ctx.row_stop)``, and ``low`` those rows of R
        (right side) or the whole, all-reduced R (left side): :meth:`up_rows` maps it back to the
        same rows. Assign new tensors (a skipped step's snapshot keeps the old ones). No-op by default."""

    def local_rows(self, num_rows: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of an m-row matrix this process holds (all of them in one process)."""
        ctx = self.shard_ctx
        return (ctx.row_offset, ctx.row_stop) if ctx is not None and ctx.sharded else (0, num_rows)

    def up_rows(self, update: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """This process's rows of ``up(update)`` in the dense ``basis`` (``kernels.project_up``): right
        side, ``update`` holds those rows already (``U_i P``); left side, the basis's rows (``P_i U``)."""
        if self.side == "left":
            start, stop = self.local_rows(basis.shape[0])
            basis = basis[start:stop] if (start, stop) != (0, basis.shape[0]) else basis
        return kernels.project_up(update, basis, self.side)

    def down_rows(self, rows: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """``down`` of a row-sharded full-size matrix from this process's ``rows`` of it, in the dense
        ``basis``: right side, the same rows of ``X Pᵀ`` (local); left side, ``Σ_i P_iᵀ X_i``
        (one r x n all-reduce under FSDP2)."""
        if self.side == "right":
            return kernels.project_down(rows, basis, "right")
        start, stop = self.local_rows(basis.shape[0])
        if (start, stop) == (0, basis.shape[0]):
            return kernels.project_down(rows, basis, "left")
        low = kernels.project_down(rows, basis[start:stop], "left")
        return self.shard_ctx.all_reduce(low)

    # ---------------------------------------------------------------- maps
    def memo_bytes(self) -> int:
        """Bytes of the bases :meth:`memo` holds for this step (the optimizer's step counts them in its
        bounded workspace, ``lrgrad.optim.pipeline``)."""
        return sum(t.numel() * t.element_size() for t in self.__dict__.get("_memo", {}).values())

    def memo(self, key: tuple, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``build()`` once per projector object and ``key``: a generated basis (Flora's draw, DCT's
        gathered columns) shared by ``down`` and the update of one step. The optimizer builds one
        projector object per param per step, so the memo is transient (never optimizer state); it holds
        each projected param's generated basis from its ``down`` until its update."""
        memo = self.__dict__.setdefault("_memo", {})
        if key not in memo:
            memo[key] = build()
        return memo[key]

    def basis(self, state: dict[str, Any]) -> torch.Tensor:
        return state["proj_basis"]

    def basis_like(self, state: dict[str, Any], like: torch.Tensor) -> torch.Tensor:
        """The basis in ``like``'s device and dtype (what the FSDP2 wrapper slices rows from).
        Projectors whose basis is generated (a seeded draw, DCT columns) override it to build
        it in that dtype directly: a state's own dtype need not be the compute dtype (8-bit
        moments keep only codes and fp32 block maxima)."""
        return self.basis(state).to(device=like.device, dtype=like.dtype)

    def down(self, state: dict[str, Any], grad: torch.Tensor, draw: int | None = None) -> torch.Tensor:
        """``R`` = ``grad`` in the subspace's coordinates. ``draw``: the subspace of a step that has not
        refreshed yet (:meth:`draw_for_step`; only ``gradient_free`` projectors are asked for one)."""
        if draw is not None:
            raise NotImplementedError(f"{type(self).__name__} is not gradient_free: it projects in its current basis")
        return kernels.project_down(grad, self.basis(state), self.side)

    def draw_for_step(self, state: dict[str, Any], step: int) -> int:
        """The subspace ``step`` (1-based) will project with, known before its gradient: only a
        ``gradient_free`` projector can say (an identifier that :meth:`down` takes as ``draw``)."""
        raise NotImplementedError(f"{type(self).__name__} is not gradient_free: its next subspace needs the gradient")

    def shared_buffers(self, state: dict[str, Any]) -> dict[Any, int]:
        """``{key: bytes}`` of buffers shared between params instead of kept per param (DCT's one
        basis per size): ``lrgrad.optimizer_state_bytes`` counts each key once. None by default."""
        return {}

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over the ranks that share this param's rows (FSDP2's wrapper); ``t`` itself
        in one process. Full-rank updates (``lrgrad.optim.full_rank``) reduce their statistics with it."""
        return t

    def take_shared_down(self, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The step's low-rank gradient when the refresh already computed it (online PCA shares its
        ``G Pᵀ`` product), else ``None``; the FSDP2 wrapper asks before its own all-reduce."""
        return None

    def up(self, state: dict[str, Any], update: torch.Tensor) -> torch.Tensor:
        return kernels.project_up(update, self.basis(state), self.side)

    def update_param_(
        self, state: dict[str, Any], param2d: torch.Tensor, update: torch.Tensor, alpha: float, decay: float
    ) -> None:
        """``param2d <- decay * param2d + alpha * up(update)`` without an m x n temporary."""
        kernels.lowrank_update_(param2d, update, self.basis(state), self.side, alpha=alpha, decay=decay)

    def transition(self, old_state: dict[str, Any], new_state: dict[str, Any]) -> torch.Tensor:
        """Change of coordinates from the old subspace to the new one.

        right: ``T = P_old P_newᵀ`` (x_new = x T); left: ``T = P_newᵀ P_old`` (x_new = T x).
        Exactly ``down_new(up_old(x))`` for every projector with a dense basis.
        """
        p_old, p_new = self.basis(old_state), self.basis(new_state)
        if self.side == "right":
            return p_old @ p_new.T
        return p_new.T @ p_old

    def carry_moments(self, rule: Any, state: dict[str, Any], old_state: dict[str, Any]) -> None:
        """Carry ``rule``'s moments from ``old_state``'s subspace into ``state``'s
        (``moment_policy="project"``). Projectors override it when second moments
        need another treatment (e.g. the random projector)."""
        rule.change_basis(state, self.transition(old_state, state), self.side)

    # ---------------------------------------------------------------- step size
    def projected_dim(self, shape2d: tuple[int, int]) -> int:
        """Size d of the side the basis compresses to ``rank`` (n for ``"right"``, m for ``"left"``)."""
        return shape2d[1] if self.side == "right" else shape2d[0]

    def default_scale(self, shape2d: tuple[int, int]) -> float:
        """The ``scale`` used when a group has none: the factor that gives the back-projected update
        AdamW's RMS. An elementwise-normalized low-rank update (Adam, Adafactor, Lion: entries of
        size ~1) has Frobenius norm ~sqrt(r·m'); an orthonormal basis keeps that norm, so over the
        full m·n entries its RMS is sqrt(r/d) of AdamW's, and sqrt(d/r) restores it
        (README, "The one-liner")."""
        return math.sqrt(self.projected_dim(shape2d) / self.rank)

    # ---------------------------------------------------------------- memory
    def refresh_state_spec(
        self, shape2d: tuple[int, int], dtype: torch.dtype
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The tensors the first refresh adds to the per-parameter state, beyond :meth:`init_state`:
        ``{key: (shape, dtype)}`` for a ``shape2d`` gradient in the compute ``dtype``. A dense basis
        by default. ``load_state_dict`` checks a saved state against it; the memory estimator sums it."""
        return {"proj_basis": (basis_shape(shape2d, self.rank, self.side), dtype)}

    def basis_bytes(self, shape2d: tuple[int, int], dtype: torch.dtype, world_size: int = 1) -> int:
        """Bytes of :meth:`refresh_state_spec` (what the first refresh allocates) on one process, or on
        rank 0 of ``world_size`` FSDP2 ranks: :attr:`row_state_keys` hold ``ceil(m / world_size)`` rows
        there (the largest ``Shard(0)`` shard), everything else is replicated."""
        total = 0
        for key, (shape, dt) in self.refresh_state_spec(shape2d, dtype).items():
            if key in self.row_state_keys and shape:
                shape = (-(-shape[0] // world_size), *shape[1:])
            total += math.prod(shape) * torch.empty((), dtype=dt).element_size()
        return total

    def state_bytes(self, state: dict[str, Any]) -> int:
        return sum(v.numel() * v.element_size() for k, v in state.items()
                   if k.startswith("proj_") and isinstance(v, torch.Tensor))


def is_finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def finite_and_nonzero(t: torch.Tensor) -> tuple[bool, bool]:
    """``(t has no NaN/Inf, t has a nonzero entry)`` with one device sync."""
    code = float(grad_code(t))
    return code < 2, code >= 1


def guarded_basis(
    state: dict[str, Any], grad: torch.Tensor, compute: Callable[[], torch.Tensor], keep_on_zero: bool = False
) -> tuple[torch.Tensor | None, bool]:
    """``(basis, counted)``: ``compute()`` a new basis from ``grad``, or ``None`` with
    ``state["proj_failures"]`` incremented when ``grad`` is non-finite, the computation fails (e.g. an
    SVD that does not converge, GaLore issue #58) or its result is non-finite: NaN never enters a basis.

    An all-zero ``grad`` - a branch that saw no data this step (an MoE expert called on no tokens, an
    unused layer after ``zero_grad(set_to_none=False)``, the zero-gradient template step torch's
    distributed checkpoint runs on a fresh optimizer) - has no top-r subspace, and its SVD would put an
    arbitrary basis in place for a whole gap. With ``keep_on_zero`` (a basis is in place) it is
    ``(None, False)``: the previous basis stays (not a failure). On a first refresh the step still needs
    a basis of the right shape: the one ``compute()`` gives comes with ``counted=False``, and the caller
    stores it without counting it (:meth:`Projector.lacks_subspace`). One device sync either way."""
    finite, nonzero = finite_and_nonzero(grad)
    if not refresh_goes_on(state, finite, nonzero, keep_on_zero):
        return None, False
    return _computed(state, compute), nonzero


def guarded_sharded_basis(
    state: dict[str, Any], grad_local: torch.Tensor, ctx: Any, compute: Callable[[], torch.Tensor | None],
    keep_on_zero: bool = False,
) -> tuple[torch.Tensor | None, bool]:
    """:func:`guarded_basis` for an FSDP2 refresh from this rank's rows ``grad_local``: the finite and
    nonzero checks are one all-reduce of one element (``ctx.finite_and_nonzero``), so every rank takes
    the same decision; ``compute()`` must issue every collective before its local math, which then runs
    on replicated inputs, so a failure or a non-finite result is the same on all ranks."""
    finite, nonzero = ctx.finite_and_nonzero(grad_local)
    if not refresh_goes_on(state, finite, nonzero, keep_on_zero):
        return None, False
    return _computed(state, compute), nonzero


def refresh_goes_on(state: dict[str, Any], finite: bool, nonzero: bool, keep_on_zero: bool) -> bool:
    """The rule of :func:`guarded_basis` for refreshes that compute no dense basis (DCT scores, Grass rows):
    False for a non-finite gradient (counted in ``state["proj_failures"]``) and for an all-zero one while a
    basis is in place (``keep_on_zero``: kept, no failure); a zero first gradient goes on, to a provisional
    basis (``nonzero`` False: store it uncounted)."""
    if not finite:
        state["proj_failures"] += 1
        return False
    return nonzero or not keep_on_zero


def _computed(state: dict[str, Any], compute: Callable[[], torch.Tensor | None]) -> torch.Tensor | None:
    """``compute()``, or ``None`` with ``state["proj_failures"]`` incremented when it raises a linear
    algebra error, returns ``None`` or returns something non-finite."""
    try:
        basis = compute()
    except (RuntimeError, torch.linalg.LinAlgError):
        basis = None
    if basis is None or not is_finite(basis):
        state["proj_failures"] += 1
        return None
    return basis
