"""The one per-parameter step sequence, streamed through a bounded workspace.

Every way of stepping an lrgrad optimizer runs the same stages in the same order:

    prepare   the gradient in the compute dtype with ``maximize`` applied (``prepare_grad``)
    refresh   the subspace when due, carrying the moments (``advance_subspace``)
    project   R = down(G) (``projector.down``)
    rule      u = ψ(R) for a whole chunk at once (``rule.update_many``: one fused pass)
    apply     back-project (``projector.update_param_``) or APOLLO/Fira's full-rank update

``optimizer.step()`` runs them for every param with a gradient; per-layer updates
(``lrgrad.layerwise``) and compressed accumulation (``lrgrad.accumulation``) only choose *when*
they run, through :meth:`StepPipeline.step_params` (the whole sequence),
:meth:`StepPipeline.stage` / :meth:`StepPipeline.apply_staged` (the sequence split where a caller
must wait: clipping needs the global norm first) and :meth:`StepPipeline.compress` /
:meth:`StepPipeline.stage_compressed` (Flora's accumulation projects each micro-batch ahead, into
the subspace the step will use). ``tests/test_architecture.py`` checks that they call nothing else.

**Bounded temporaries.** Projected params stream through the rule in chunks: a chunk closes once its
low-rank gradients and the bases its projectors generated (Flora's draws, DCT's columns) reach
``step_workspace_bytes`` (:data:`STEP_WORKSPACE_BYTES`, 32 MiB), so the step never holds every
projected gradient at once; the rule still batches every param of a chunk in one multi-tensor pass.
A projected param's prepared full gradient lives only while it is projected; an update that reads
the full gradient (APOLLO, Fira) prepares it again when it is applied, so one fp32 copy exists at a
time. Full-rank params whose rule can view its state in slices (``UpdateRule.slice_state``: AdamW elementwise,
8-bit AdamW by whole blocks) are stepped on flat slices of at most ``step_workspace_bytes / 4``
elements, batched across params, so a bf16
embedding never gets a whole-tensor fp32 copy of its gradient, weight or denominator; other rules
step whole tensors in batches of that size. Elementwise arithmetic on slices is the arithmetic on the
whole tensor, so the chunking changes no bit (tested against the unchunked step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lrgrad.dtensor import is_dtensor
from lrgrad.experts import expert_of, expert_views, is_expert_stack, is_sharded_stack, live_experts, local_tensor
from lrgrad.optim.nonfinite import probe as nonfinite_probe
from lrgrad.qweights import QuantizedWeight
from lrgrad.subspace import matrix_shape

#: the default byte budget of one chunk of the step (see the module docstring)
STEP_WORKSPACE_BYTES = 32 * 2**20


@dataclass
class Staged:
    """One param between its projection and its update."""

    param: torch.Tensor
    group: dict[str, Any]
    #: the raw gradient (never modified): full-rank params, and projected ones whose update reads G
    grad: torch.Tensor | None
    #: the low-rank gradient in this step's subspace (projected params), owned by the step
    low: torch.Tensor | None = None
    projector: Any = None
    #: the state before the refresh, for :meth:`StepPipeline.unstage` (None: not undoable)
    snapshot: dict[str, Any] | None = None

    def workspace_bytes(self) -> int:
        """Bytes this item keeps alive until its update: its low-rank gradient and generated bases."""
        if self.low is None:
            return 0
        return self.low.numel() * self.low.element_size() + self.projector.memo_bytes()


def prepare(grad: torch.Tensor, dtype: torch.dtype, maximize: bool) -> torch.Tensor:
    """The prepare stage: ``grad`` in ``dtype`` (the compute dtype, or a full-rank param's state dtype),
    negated for ``maximize`` (a new tensor whenever it differs; the input is never written)."""
    grad = grad.to(dtype)
    return -grad if maximize else grad


def _pieces(p: torch.Tensor, g: torch.Tensor, state: dict[str, Any], size: int, rule: Any):
    """``(param, grad, state)`` views of at most ``size`` flat elements each, or the param whole when the
    rule cannot slice its state (``UpdateRule.slice_state``) or a tensor cannot be viewed flat."""
    numel = p.numel()
    whole = [(p, g, state)]
    if (numel <= size or is_dtensor(p) or isinstance(p, QuantizedWeight)
            or not (p.is_contiguous() and g.is_contiguous())):
        return whole
    states = [rule.slice_state(state, p, start, min(start + size, numel)) for start in range(0, numel, size)]
    if any(s is None for s in states):
        return whole
    flat_p, flat_g = p.view(-1), g.view(-1)
    return [(flat_p[start:start + size], flat_g[start:start + size], piece)
            for start, piece in zip(range(0, numel, size), states)]


def full_rank_pieces(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, Any]],
                     max_elements: int, rule: Any):
    """Batches ``(params, grads, states)`` that cover every element once, each of at most
    ``max_elements`` elements: a large param is cut into flat views where ``rule.slice_state`` can
    view its state alike (so in-place updates land in the real state); otherwise a param larger than
    the budget forms a batch of its own."""
    batch: tuple[list, list, list] = ([], [], [])
    size = 0
    for p, g, state in zip(params, grads, states):
        for piece in _pieces(p, g, state, max_elements, rule):
            n = piece[0].numel()
            if batch[0] and size + n > max_elements:
                yield batch
                batch, size = ([], [], []), 0
            for out, x in zip(batch, piece):
                out.append(x)
            size += n
    if batch[0]:
        yield batch


def finish_deferred(deferred: list) -> None:
    """Hand each projector class the refresh work its instances deferred in one chunk (items start
    with the projector), in the order they were deferred."""
    by_class: dict[type, list] = {}
    for item in deferred:
        by_class.setdefault(type(item[0]), []).append(item)
    for cls, items in by_class.items():
        cls.finish_deferred(items)


class StepPipeline:
    """The step's sequencing, mixed into ``LowRankOptimizer`` (which provides the stages)."""

    #: byte budget of one chunk of the step's temporaries (module docstring); set per optimizer
    step_workspace_bytes: int = STEP_WORKSPACE_BYTES

    # ------------------------------------------------------------------ the whole sequence
    def step_params(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """Step ``params`` of ``group`` with ``grads`` (never modified), chunk by chunk."""
        if not params:
            return
        self.check_projectable(group)
        for g in grads:
            self.check_grad(g)
        params, grads = self.expand_experts(group, params, grads)
        # an FSDP2 stack's experts are this rank's own (plain local views, no collective), and the ranks hold
        # different ones: they step after the rest, in chunks of their own, so the chunks holding sharded
        # params (whose refreshes and checks are collectives) close alike on every rank
        local = [is_sharded_stack(expert_of(p)[0]) if expert_of(p) is not None else False for p in params]
        if any(local):
            self._step_chunks(group, [p for p, x in zip(params, local) if not x],
                              [g for g, x in zip(grads, local) if not x])
            params = [p for p, x in zip(params, local) if x]
            grads = [g for g, x in zip(grads, local) if x]
        self._step_chunks(group, params, grads)

    def _step_chunks(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """Stage ``params`` (matrices: stacks already expanded) chunk by chunk and apply each chunk."""
        chunk: list[Staged] = []
        full: list[Staged] = []
        deferred: list = []  # refresh work the projectors batch across the chunk's params
        used = 0
        for p, g in zip(params, grads):
            item = self.stage(p, group, g, deferred=deferred)
            if item is None:
                continue
            if item.low is None:
                full.append(item)  # holds only the raw gradient: stepped in slices at the end
                continue
            chunk.append(item)
            used += item.workspace_bytes()
            if used >= self.step_workspace_bytes:
                self._apply_chunk(group, chunk, deferred)
                chunk, deferred, used = [], [], 0
        self._apply_chunk(group, chunk, deferred)
        self._apply_full(group, full)

    def expand_experts(self, group: dict[str, Any], params: list[torch.Tensor],
                       grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``params`` with each expert stack (``lrgrad.experts``) replaced by its experts' views, in expert
        order, and ``grads`` alike (an FSDP2 stack: the experts of this rank's shard, on its local tensors):
        every later stage sees separate matrices. An expert whose gradient
        slice is exactly zero while another's is not is left out (skipped this step, as a separate expert
        with no ``.grad``; ``lrgrad.experts.live_experts``)."""
        stacks = [(p, g) for p, g in zip(params, grads) if is_expert_stack(p, group)]
        if not stacks:
            return params, grads
        live = iter(live_experts([p for p, _ in stacks], [g for _, g in stacks]))
        out_params, out_grads = [], []
        for p, g in zip(params, grads):
            if not is_expert_stack(p, group):
                out_params.append(p)
                out_grads.append(g)
                continue
            if not self.state[p]:
                self.init_param_state(p, group, self.state[p])
            for view, grad, has_grad in zip(expert_views(p), local_tensor(g).unbind(0), next(live)):
                if has_grad:
                    out_params.append(view)
                    out_grads.append(grad)
        return out_params, out_grads

    # ------------------------------------------------------------------ the sequence, split
    def stage(self, param: torch.Tensor, group: dict[str, Any], grad: torch.Tensor, *, undoable: bool = False,
              deferred: list | None = None) -> Staged | None:
        """Prepare, refresh and project ``param``'s gradient; ``None`` when its step is skipped.

        ``undoable``: keep what :meth:`unstage` needs to put the state back (a caller that applies
        later and may drop the step); such a caller's gradient is checked for NaN/Inf here, before
        the refresh (``skip_nonfinite``), since the chunk's check runs only in :meth:`apply_staged`.
        ``deferred``: the chunk's list for refresh work batched across params (``step_params``).
        """
        self.check_grad(grad)
        self.check_layout(param, group)  # per-layer updates stage from hooks, without step()'s checks
        state = self.state_of(param)
        if not state:
            self.init_param_state(param, group, state)
        if not self.is_projected(param, group):
            return Staged(param, group, grad)
        # one projector object for the param's whole step: a generated basis (Flora's draw, DCT's
        # columns) is built once for down() and the update (Projector.memo)
        projector = self.projector_for(param, group)
        # the whole gradient is checked here when the chunk's check of the low-rank one cannot see
        # every entry: a caller that applies later, or a projector whose down() drops entries
        read_whole = undoable or not projector.down_reads_every_entry
        nonfinite = read_whole and group["skip_nonfinite"] and self.nonfinite_flags([grad])[0]
        prepared = self.prepare_grad(param, group, grad, nonfinite=nonfinite)
        if prepared is None:
            return None
        # a skipped step must leave the state as it was: keep the state before the refresh
        snapshot = self.snapshot_state(param) if undoable or group["skip_nonfinite"] else None
        projector.deferred = deferred
        low = self.project_grad(param, group, prepared, projector)
        if low is None:
            return None
        keep = grad if self.needs_full_grad(param, group) else None  # prepared again when applied
        return Staged(param, group, keep, low, projector, snapshot)

    def apply_staged(self, items: list[Staged], grad_scale: float = 1.0) -> None:
        """Run the rule and apply the update of staged params (in order, chunk by chunk, each group with
        its own rule). ``grad_scale`` multiplies the low-rank gradients first (a clip factor < 1)."""
        by_group: dict[int, list[Staged]] = {}
        for item in items:
            by_group.setdefault(id(item.group), []).append(item)
        for group_items in by_group.values():
            group = group_items[0].group
            projected = [i for i in group_items if i.low is not None]
            full = [i for i in group_items if i.low is None]
            if grad_scale != 1.0:
                for item in projected:
                    item.low = item.low * grad_scale
            chunk: list[Staged] = []
            used = 0
            for item in projected:
                chunk.append(item)
                used += item.workspace_bytes()
                if used >= self.step_workspace_bytes:
                    self._apply_chunk(group, chunk, [])
                    chunk, used = [], 0
            self._apply_chunk(group, chunk, [])
            self._apply_full(group, full)

    def unstage(self, items: list[Staged]) -> None:
        """Drop staged steps: every refresh and counter goes back to the state before :meth:`stage`."""
        for item in items:
            if item.snapshot is not None:
                self.restore_state(item.param, item.snapshot)

    # ------------------------------------------------------------------ projecting ahead (Flora)
    def can_compress(self, param: torch.Tensor, group: dict[str, Any]) -> bool:
        """Whether ``param``'s micro-batch gradients can be projected before the step: it is projected,
        its subspace does not depend on the gradient (``Projector.gradient_free``), its update does
        not read the full gradient and it is no expert stack (each expert steps on its own)."""
        return (self.is_projected(param, group) and self.projector_for(param, group).gradient_free
                and not self.needs_full_grad(param, group) and not is_expert_stack(param, group))

    def compress(self, param: torch.Tensor, group: dict[str, Any], grad: torch.Tensor,
                 draw: int | None = None) -> tuple[torch.Tensor, int]:
        """Prepare ``grad`` and project it into the subspace the next step will use (``draw``: that
        subspace, from an earlier micro-batch of the window; ``None``: ask the projector). Returns the
        low-rank gradient and the draw. Linear, so the sum over micro-batches is the projection of
        the summed gradient, ``maximize`` included."""
        self.check_layout(param, group)
        prepared = self.prepare_grad(param, group, grad)
        state = self.state_of(param)
        projector = self.projector_for(param, group)
        if draw is None:
            draw = projector.draw_for_step(state, state["step"] + 1)
        return projector.down(state, prepared.reshape(matrix_shape(param)), draw=draw), draw

    def stage_compressed(self, param: torch.Tensor, group: dict[str, Any], low: torch.Tensor,
                         draw: int) -> Staged | None:
        """Stage a param whose gradient :meth:`compress` already projected (``low``, summed over
        micro-batches): refresh (no gradient read) and check that the subspace is ``draw``'s."""
        snapshot = self.snapshot_state(param) if group["skip_nonfinite"] else None
        projector = self.projector_for(param, group)
        if not self.advance_subspace(param, group, None, projector):
            return None
        if self.state_of(param)["proj_refreshes"] != draw:
            raise RuntimeError(
                "CompressedAccumulator: the optimizer stepped this parameter between micro-batches "
                "(call acc.step(), not optimizer.step(), once per window)"
            )
        return Staged(param, group, None, low, projector, snapshot)

    # ------------------------------------------------------------------ the back half
    def _apply_chunk(self, group: dict[str, Any], chunk: list[Staged], deferred: list) -> None:
        """Finish the chunk's deferred refreshes, skip non-finite ones, run the rule over the chunk in
        one pass and apply each update."""
        finish_deferred(deferred)
        if not chunk:
            return
        if group["skip_nonfinite"]:
            # A NaN/Inf anywhere in G reaches R = down(G) (IEEE propagation through the matmul), so
            # projected params are checked on the small low-rank gradient. A refresh may already have
            # run (a gradient-free one, e.g. Flora's resample, even on a non-finite G): the snapshot
            # puts every state entry and counter back.
            bad = self.nonfinite_flags([item.low for item in chunk])
            for item, is_bad in zip(chunk, bad):
                if is_bad:
                    self.restore_state(item.param, item.snapshot)
                    self.count_skip(item.param)
            chunk = [item for item, is_bad in zip(chunk, bad) if not is_bad]
            if not chunk:
                return
        rule = self.rule_for(group)
        keep_full = group["full_rank"] is not None
        states = [self.state_of(item.param) for item in chunk]
        # the low-rank gradients are this chunk's own tensors, needed after the rule only by a
        # full-rank update: otherwise the directions may overwrite them
        updates = rule.update_many(states, [item.low for item in chunk], [s["step"] for s in states],
                                   reuse_grads=not keep_full)
        for item, update in zip(chunk, updates):
            grad = self.prepare_grad(item.param, group, item.grad) if item.grad is not None else None
            self.apply_low_rank(item.param, group, item.low, rule, grad=grad, update=update,
                                projector=item.projector)
            item.low = item.projector = None  # its generated bases go with it

    def _apply_full(self, group: dict[str, Any], items: list[Staged]) -> None:
        """Full-rank params: skip the non-finite ones, then the rule on bounded slices."""
        if not items:
            return
        params, grads = [i.param for i in items], [i.grad for i in items]
        if group["skip_nonfinite"]:
            # the finiteness of the prepared gradient, one param's copy at a time, one sync
            sums = [nonfinite_probe(self.prepare_grad(p, group, g)) for p, g in zip(params, grads)]
            bad = self.nonfinite_flags(sums)
            for p, is_bad in zip(params, bad):
                if is_bad:
                    self.count_skip(p)
            params = [p for p, is_bad in zip(params, bad) if not is_bad]
            grads = [g for g, is_bad in zip(grads, bad) if not is_bad]
        self.apply_full_rank(group, params, grads, self.rule_for(group))
