"""lrgrad beyond one device: DDP, FSDP2 (DTensor) and distributed checkpoints.

Everything here is built on ``torch.distributed`` - ``DistributedDataParallel``,
FSDP2's ``fully_shard`` (parameters become ``DTensor``\\ s sharded along dim 0),
``DTensor`` itself and ``torch.distributed.checkpoint`` (DCP). There is no
home-made sharding.

**DDP.** Gradients are all-reduced by DDP before ``optimizer.step()``, so every
rank feeds bit-identical gradients to the projector; seeds are derived from the
parameter index (``LowRankOptimizer._param_seed``). Projector state therefore
stays identical on every rank without any extra communication. Per-layer
updates (``LayerwiseOptimizer``) need the *reduced* gradient, which a
post-accumulate-grad hook never sees (it fires before DDP's bucketed
all-reduce): :func:`ddp_layerwise` moves the per-layer step into a DDP
communication hook, after the all-reduce of each bucket.

**FSDP2.** A projected parameter that is a ``DTensor`` sharded as ``Shard(0)``
gets a ``lrgrad.projectors.sharded.ShardedProjector`` around its projector (the
routing lives in ``LowRankOptimizer.projector_for``; the DTensor helpers in
``lrgrad.dtensor``). Row ``i`` of ``G`` lives on one rank only:

* ``side="right"`` (P is r x n, the unsharded side): ``R_i = G_i Pᵀ`` is local,
  the moments ``R`` are ``Shard(0)`` DTensors (m x r, sharded like the weight),
  the update ``W_i += α U_i P`` is local.
* ``side="left"`` (P is m x r, along the sharded side): ``R = Σ_i P_iᵀ G_i`` is
  all-reduced (r x n per step), the rule state is replicated, ``W_i += α P_i U``
  is local.
* Refresh: each projector's ``refresh_sharded(state, grad_local, step, group, ctx)``
  with a ``lrgrad.dtensor.ShardContext`` (``all_reduce``, ``all_gather_rows``, row
  ranges). The SVD and Q-GaLore projectors run the seeded sketch
  (``lrgrad.projectors.svd.sketch_basis``: n x k all-reduces, both sides), online
  PCA all-reduces its row sums, DCT its column scores (right side). Where a
  projector returns ``NotImplemented`` (DCT's left side, ``svd_sharded="gather"``)
  the gradient is all-gathered for the refresh only (``DTensor.full_tensor``).
* Update rules run on ``DTensor`` low-rank gradients and states, so element-wise
  rules (AdamW, Lion) are shard-local, rules with reductions (Adafactor's
  row/column factors) get exactly the collectives they need from DTensor's
  sharding propagation, and ``adamw8bit`` quantizes each shard's rows in its own
  blocks (``lrgrad.dtensor.shard_block_state``).
* Per-layer updates (``LayerwiseOptimizer``) work: FSDP2 runs post-accumulate-grad
  hooks on the sharded params after the reduce-scatter.

**Sign convention.** A singular vector is defined up to its sign; the sketch and
the Gram path make the largest-magnitude entry of every right singular vector positive.
``moment_policy="project"``/``"reset"`` are sign-invariant, so sharded and
unsharded runs agree to float tolerance; with ``"keep"`` a direction whose
LAPACK sign differs keeps moments of the opposite sign (GaLore's own behaviour
across LAPACK builds), so there they agree up to those signs.

**Checkpoints.** :func:`save_checkpoint` / :func:`load_checkpoint` go through
``torch.distributed.checkpoint.state_dict.get_state_dict`` and DCP, keyed by
parameter names, so an FSDP2 checkpoint loads into a single-process run (and
back) with resharding done by DCP. 8-bit moments of sharded params have a per-shard
block layout: they resume in the same world size, and :func:`check_checkpoint_shapes`
refuses another by name. MoE expert stacks reshard too: their saved experts are keyed by global
index (``lrgrad.experts``), and a load takes each expert's keys from the checkpoint
(:func:`expert_templates_from_checkpoint`). Each save ends with a sha256 manifest that a load
verifies before ``dcp.load`` unpickles DCP's ``.metadata``: trust a DCP folder as you would
any pickle (see :func:`load_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lrgrad.layerwise import LayerwiseOptimizer
from lrgrad.qweights import SINGLE_PROCESS_REASON, quantized_modules

PARALLEL_MODES = ("none", "ddp", "fsdp2")


# ---------------------------------------------------------------------------- wrapping a model
def setup_parallel(
    model: nn.Module,
    mode: str,
    device: torch.device | str | None = None,
    shard_modules: Callable[[nn.Module], list[nn.Module]] | None = None,
    **ddp_kwargs: Any,
) -> nn.Module:
    """Wrap ``model`` for data parallelism; call after ``torch.distributed.init_process_group``.

    * ``"none"``: returned unchanged.
    * ``"ddp"``: ``DistributedDataParallel`` (on ``device``'s index for CUDA).
    * ``"fsdp2"``: ``fully_shard`` on every transformer block (``shard_modules(model)``;
      default: each child of every ``nn.ModuleList``), then on the root. Parameters
      become ``Shard(0)`` DTensors; build the optimizer *after* this call.
    """
    if mode not in PARALLEL_MODES:
        raise ValueError(f"Invalid mode: {mode!r}; expected one of {PARALLEL_MODES}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model: expected an nn.Module, got {type(model).__name__}")
    if mode == "none":
        return model
    quantized = [name for name, _ in quantized_modules(model)]
    if quantized:
        raise ValueError(f"Invalid mode: {mode!r} for a model with INT8 weights ({', '.join(quantized[:3])}"
                         f"{', ...' if len(quantized) > 3 else ''}); {SINGLE_PROCESS_REASON}")
    import torch.distributed as dist

    if not dist.is_initialized():
        raise ValueError(f"Invalid mode: {mode!r} needs torch.distributed.init_process_group() first")
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = torch.device(device) if device is not None else next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, **ddp_kwargs)
    from torch.distributed.fsdp import fully_shard

    if shard_modules is None:
        blocks = [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst]
    else:
        blocks = list(shard_modules(model))
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def init_from_env(backend: str | None = None) -> tuple[int, int, torch.device]:
    """``init_process_group`` from torchrun's environment; returns (rank, world_size, device)."""
    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"))
    return rank, world, device


# ---------------------------------------------------------------------------- per-layer updates under DDP
def ddp_layerwise(ddp_model: nn.Module, layerwise: Any) -> None:
    """Run ``LayerwiseOptimizer`` updates inside DDP's communication hook.

    A post-accumulate-grad hook fires before DDP's bucketed all-reduce, so it
    would step on the local gradient. This removes those hooks and registers a
    comm hook that all-reduces each bucket (averaging, as DDP does) and then
    hands each of the bucket's parameters, now holding the reduced gradient,
    to the layerwise optimizer - still overlapping with the rest of backward.
    Gradient accumulation: use ``ddp_model.no_sync()`` on all but the last
    micro-batch (reduction is linear, so reducing every micro-batch is correct too).
    """
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(f"Invalid ddp_model: expected DistributedDataParallel, got {type(ddp_model).__name__}")
    if not isinstance(layerwise, LayerwiseOptimizer):
        raise TypeError(f"Invalid layerwise: expected a LayerwiseOptimizer, got {type(layerwise).__name__}")
    layerwise.remove_hooks()
    group = ddp_model.process_group

    def hook(_state, bucket):  # unannotated: DDP checks annotations, and ours are strings
        buffer = bucket.buffer()
        buffer.div_(dist.get_world_size(group))
        work = dist.all_reduce(buffer, group=group, async_op=True)

        def step_bucket(fut: torch.futures.Future) -> torch.Tensor:
            reduced = fut.value()[0] if isinstance(fut.value(), list) else fut.value()
            if layerwise.last_micro_batch:
                with torch.no_grad():
                    for p, g in zip(bucket.parameters(), bucket.gradients()):
                        p.grad = g  # a view of the reduced bucket
                        layerwise.handle_grad(p)
            return reduced

        return work.get_future().then(step_bucket)

    ddp_model.register_comm_hook(None, hook)


# ---------------------------------------------------------------------------- checkpoints
#: the file :func:`write_manifest` writes into a checkpoint folder (sha256 and size of every other file)
MANIFEST_NAME = "lrgrad_manifest.json"
_MANIFEST_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, damaged or does not fit; ``str()`` names the file and the cause."""

    def __init__(self, path: str | os.PathLike, cause: str):
        self.path = os.fspath(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files_under(folder: str, skip: str) -> list[str]:
    """Relative POSIX paths of every file under ``folder`` except ``skip`` (sorted)."""
    out = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if rel != skip:
                out.append(rel)
    return sorted(out)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or a new file in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_manifest(folder: str | os.PathLike, name: str = MANIFEST_NAME) -> str:
    """Record the sha256 and size of every file under ``folder`` in ``folder/name``; returns its path.

    Written last (temporary file, fsync, ``os.replace``), so a manifest exists only once every file
    it lists is complete. It detects damage (a truncated or bit-flipped file, a half-written
    folder), not tampering: whoever can write the folder can rewrite the manifest.
    """
    folder = os.fspath(folder)
    files = {rel: {"bytes": os.path.getsize(os.path.join(folder, rel)), "sha256": _sha256(os.path.join(folder, rel))}
             for rel in _files_under(folder, name)}
    target = os.path.join(folder, name)
    tmp = f"{target}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"format": _MANIFEST_FORMAT, "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    fsync_dir(folder)
    return target


def verify_manifest(folder: str | os.PathLike, name: str = MANIFEST_NAME) -> dict[str, Any]:
    """Check every file of ``folder`` against its manifest; raise :class:`CheckpointError` naming the first bad one.

    Causes: the manifest is missing, empty or not a manifest; a listed file is missing, has another
    size or another sha256; a file is present that the manifest does not list. Returns the manifest.
    """
    folder = os.fspath(folder)
    path = os.path.join(folder, name)
    if not os.path.isdir(folder):
        raise CheckpointError(folder, "no such checkpoint folder")
    if not os.path.isfile(path):
        raise CheckpointError(path, "missing manifest (an incomplete checkpoint: a write did not finish)")
    if os.path.getsize(path) == 0:
        raise CheckpointError(path, "empty file")
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("format") != _MANIFEST_FORMAT or not isinstance(files, dict) or not all(
                isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)
                for e in files.values()):
            raise ValueError("unknown format")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(path, f"not a checkpoint manifest ({exc})") from None
    for rel, entry in sorted(files.items()):
        file = os.path.join(folder, rel)
        if not os.path.isfile(file):
            raise CheckpointError(file, "missing (listed in the manifest)")
        size = os.path.getsize(file)
        if size != entry["bytes"]:
            cause = "empty file" if size == 0 else "truncated" if size < entry["bytes"] else "longer than written"
            raise CheckpointError(file, f"{cause}: {size} bytes, the manifest says {entry['bytes']}")
        if _sha256(file) != entry["sha256"]:
            raise CheckpointError(file, "sha256 mismatch: the file changed after it was written (damaged)")
    for rel in _files_under(folder, name):
        if rel not in files:
            raise CheckpointError(os.path.join(folder, rel), "not listed in the manifest (unexpected file)")
    return manifest


def _verify_on_rank0(folder: str) -> None:
    """Rank 0 hashes the folder (a shared file system) and tells every rank the verdict."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        verify_manifest(folder)
        return
    verdict: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            verify_manifest(folder)
        except CheckpointError as exc:
            verdict[0] = (exc.path, exc.cause)
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise CheckpointError(*verdict[0])


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    extra: dict[str, Any] | None = None, *, manifest: bool = True) -> None:
    """Save model + optimizer with ``torch.distributed.checkpoint`` (each rank writes its shards).

    With ``manifest=True`` rank 0 then writes :data:`MANIFEST_NAME` (sha256 of every file; the
    folder must be on a file system every rank shares, as DCP's own metadata assumes), which
    :func:`load_checkpoint` verifies. A manifest left by an earlier save into the same folder is
    removed first, so a save that dies midway never looks complete.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    distributed = dist.is_available() and dist.is_initialized()
    main = not distributed or dist.get_rank() == 0
    stale = os.path.join(os.fspath(path), MANIFEST_NAME)
    if main and os.path.exists(stale):
        os.unlink(stale)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if extra:
        state["extra"] = extra
    dcp.save(state, checkpoint_id=os.fspath(path))
    if manifest:
        if main:
            write_manifest(path)
        if distributed:
            dist.barrier()  # nobody loads (or moves) the folder before its manifest exists


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    *, verify: bool = True) -> None:
    """Load a checkpoint written by :func:`save_checkpoint`, resharding to this run's layout.

    Works across layouts: FSDP2 (any world size) <-> DDP <-> a single process.
    Optimizer state is created first (``get_state_dict`` runs one zero-lr step on
    a fresh optimizer) and then overwritten exactly.

    **Trust.** DCP's ``.metadata`` file is a pickle, and ``dcp.load`` unpickles it: loading a
    crafted folder runs its code. Load DCP checkpoints only from sources you would trust with
    any pickle. ``verify=True`` (the default) checks the folder against its manifest *before*
    anything is unpickled and raises :class:`CheckpointError` naming the damaged file; it catches
    damage, not a forger who rewrites the manifest too. ``verify=False`` is for a caller that
    has verified the folder itself (or a folder written with ``manifest=False``).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if verify:
        _verify_on_rank0(os.fspath(path))
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    metadata = saved_metadata(path)
    check_checkpoint_shapes(path, state, metadata)
    expert_templates_from_checkpoint(path, optimizer, state["optim"], metadata=metadata)
    counters_from_checkpoint(path, state["optim"], metadata=metadata)
    dcp.load(state, checkpoint_id=os.fspath(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def expert_templates_from_checkpoint(path: str | os.PathLike, optimizer: torch.optim.Optimizer,
                                     optim_sd: dict[str, Any], prefix: str = "optim",
                                     metadata: dict[str, Any] | None = None) -> None:
    """Make the load template of each expert stack's experts (``lrgrad.experts``) the state the checkpoint holds
    for the experts this process holds: the keys under ``<prefix>.state.<stack>.experts.<e>.``, tensors of the
    saved shape and dtype, ``None`` for the non-tensor leaves that DCP fills in.

    Why not the template ``get_state_dict`` made: its zero-gradient step steps (and refreshes) every expert, and
    DCP loads exactly the template's keys. An expert that had received no token when the checkpoint was written
    has no subspace in it (a template key missing from the checkpoint: DCP refuses the load), and a key that
    appears on a later event (``nonfinite_skips``) would be silently left out. Expert keys do not depend on the
    world size (``lrgrad.experts.saved_experts``), so the saving run's layout does not matter. ``ValueError``
    naming the stack and the expert when the checkpoint has no state for an expert this process holds."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from lrgrad.experts import is_expert_stack, local_experts, local_tensor

    stacks = {}  # the flattened key head of each stack's experts -> (its fqn, the stack)
    for group, saved_group in zip(optimizer.param_groups, optim_sd.get("param_groups", [])):
        for p, fqn in zip(group["params"], saved_group["params"]):
            if is_expert_stack(p, group) and fqn in optim_sd["state"]:
                stacks[f"{prefix}.state.{fqn}.experts."] = (fqn, p)
    if not stacks:
        return
    # one pass over the checkpoint's keys: {head: {expert: {state key: metadata}}}
    saved: dict[str, dict[str, dict[str, Any]]] = {head: {} for head in stacks}
    marker = ".experts."
    for key, meta in (saved_metadata(path) if metadata is None else metadata).items():
        at = key.find(marker)
        while at >= 0:
            head = key[:at + len(marker)]
            expert, _, leaf = key[len(head):].partition(".")
            if head in saved and leaf:  # no leaf: the None of another rank's expert in a list-form state
                saved[head].setdefault(expert, {})[leaf] = meta
            at = key.find(marker, at + 1)
    for head, (fqn, p) in stacks.items():
        device = local_tensor(p).device
        experts = {}
        for e in range(*local_experts(p)):
            meta = saved[head].get(str(e))
            if not meta:
                raise ValueError(f"Invalid checkpoint: it has no optimizer state for expert {e} of the expert stack "
                                 f"{fqn!r} (saved for another model, or without experts=True?)")
            experts[str(e)] = {leaf: torch.empty(tuple(m.size), dtype=m.properties.dtype, device=device)
                               if isinstance(m, TensorStorageMetadata) else None for leaf, m in meta.items()}
        optim_sd["state"][fqn] = {"experts": experts}


def counters_from_checkpoint(path: str | os.PathLike, optim_sd: dict[str, Any], prefix: str = "optim",
                             metadata: dict[str, Any] | None = None) -> None:
    """Add to the load template each param's non-tensor state entry that the checkpoint holds and the
    template lacks (``None``, which DCP fills in). Why: DCP loads exactly the template's keys, and the
    template comes from a fresh zero-gradient step, so a counter that appears on a later event
    (``nonfinite_skips``: steps skipped for a non-finite gradient) would be silently reset by a resume."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    heads = {f"{prefix}.state.{fqn}.": state for fqn, state in optim_sd.get("state", {}).items()
             if isinstance(state, dict)}
    if not heads:
        return
    for key, meta in (saved_metadata(path) if metadata is None else metadata).items():
        if not isinstance(meta, BytesStorageMetadata):
            continue
        head, _, leaf = key.rpartition(".")
        state = heads.get(head + ".")
        if state is not None and leaf not in state:
            state[leaf] = None


def _tensor_leaves(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors of a nested state dict keyed as DCP flattens them (``a.b.c``)."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(_tensor_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(tree, torch.Tensor):
        out[prefix] = tree
    return out


def saved_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's ``{flattened key: storage metadata}`` (DCP's ``.metadata``, unpickled: see
    :func:`load_checkpoint` on trust). Read once per load and handed to the checks below."""
    import torch.distributed.checkpoint as dcp

    return dcp.FileSystemReader(os.fspath(path)).read_metadata().state_dict_metadata


def check_checkpoint_shapes(path: str | os.PathLike, state: dict[str, Any],
                            metadata: dict[str, Any] | None = None) -> None:
    """Refuse a checkpoint whose tensors have other global shapes than this run's, naming them.

    DCP reshards a tensor across world sizes only when its global shape is the same.
    8-bit moments of FSDP2-sharded params keep one block-maxima row per shard
    (``lrgrad.dtensor.shard_block_state``), so they are the usual case: such a
    checkpoint loads into the world size it was saved from.
    """
    saved = saved_metadata(path) if metadata is None else metadata
    for key, tensor in _tensor_leaves(state).items():
        meta = saved.get(key)
        size = getattr(meta, "size", None)
        if size is not None and tuple(size) != tuple(tensor.shape):
            hint = (" - 8-bit moments of FSDP2-sharded params are quantized per row shard, so they load only "
                    "into the world size that saved them (resume there, or train with fp32 moments)"
                    if key.endswith("_absmax") else "")
            raise ValueError(f"Invalid checkpoint: {key} was saved with shape {tuple(size)}, this run expects "
                             f"{tuple(tensor.shape)}{hint}")


__all__ = ["MANIFEST_NAME", "PARALLEL_MODES", "CheckpointError", "check_checkpoint_shapes", "ddp_layerwise",
           "counters_from_checkpoint", "expert_templates_from_checkpoint", "fsync_dir", "init_from_env",
           "load_checkpoint", "save_checkpoint", "saved_metadata", "setup_parallel", "verify_manifest",
           "write_manifest"]
