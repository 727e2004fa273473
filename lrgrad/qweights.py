"""INT8 / INT4 weights updated with stochastic rounding (Q-GaLore's weight path).

"Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive Low-Rank
Gradients", Zhang et al. 2024, arXiv:2407.08296, Sec. 3: weights are kept in
INT8 with per-group scale/zero; after each optimizer step the updated weight is
quantized back with *stochastic rounding* ``q = floor(y) + Bernoulli(y - floor(y))``,
so ``E[dequant(q)] = w`` and updates far smaller than one quantization step still
move the weight in expectation (round-to-nearest would drop them: training stalls).

Layout of a :class:`QuantizedLinear` (``bits=8``)::

    codes  int8 (out, in)        q - 128, q in [0, 255]      (bits=4: uint8, two codes per byte)
    scale  fp16 (out * ceil(in / group_size),)   one per group of ``group_size`` consecutive elements of a
                                   row; a row length that ``group_size`` does not divide ends in a
                                   shorter group (LLaMA-1B's down_proj rows of 5461 with 256: 21 full
                                   groups and one of 85)
    zero   fp16 (same)                      w ~= scale * (q - zero)
    rounding_seed, rounding_step   int64 scalars: the stochastic-rounding generator (resume = bit-identical)
    weight  a float Parameter *handle*: the weight's shape and dtype, backed by one element (stride 0)

The codes/scale/zero convention is that of ``lrgrad.quant.quantize_int8`` /
``quantize_int4`` (tested equal). The handle is what optimizers see: autograd
delivers the full float weight gradient to ``weight.grad``, and every lrgrad
optimizer recognises ``weight.lrgrad_codec`` and applies its update to a
dequantized fp32 work copy, then calls :meth:`QuantizedLinear.requantize_`.
``torch.optim`` optimizers cannot update the handle (in-place writes to a stride-0
tensor raise), so they fail loudly instead of silently training nothing.

Requantization keeps each group's grid (scale, zero) while the updated values fit
on it, so an unchanged element keeps its code exactly and a changed one moves by
an unbiased stochastic rounding of its update. A group whose values leave the grid
gets a new grid with ``HEADROOM`` of its range added on each side (so regrids are
rare: each one re-rounds the whole group).
"""

from __future__ import annotations

import copy
import math
import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lrgrad._checks import check_int
from lrgrad.groups import matches
from lrgrad.kernels import stochastic_round
from lrgrad.quant import ZERO_LIMIT, fp16_round_up, pack_int4, unpack_int4

#: fraction of a group's range added on each side when a grid is (re)built
HEADROOM = 1.0 / 16.0
ROUNDING_MODES = ("stochastic", "nearest")


def build_grid(groups: torch.Tensor, levels: int, headroom: float = HEADROOM) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 ``(scale, zero)`` per row of ``groups`` covering ``[min - h, max + h]``, ``h = headroom * (max - min)``.

    As in ``lrgrad.quant``: the scale is rounded *up* to fp16 and kept ``>= max|x| / 1024`` so the
    integer zero point is exact in fp16.
    """
    lo, hi = groups.amin(dim=1), groups.amax(dim=1)
    pad = (hi - lo) * headroom
    lo, hi = lo - pad, hi + pad
    scale = torch.maximum((hi - lo) / levels, torch.maximum(lo.abs(), hi.abs()) / ZERO_LIMIT)
    scale = fp16_round_up(torch.where(scale > 0, scale, torch.ones_like(scale)))
    zero = torch.round(-lo / scale.float()).clamp_(-ZERO_LIMIT - levels, ZERO_LIMIT + levels)
    return scale, zero.to(torch.float16)


def _make_handle(shape: torch.Size, dtype: torch.dtype, device: torch.device, module: QuantizedLinear,
                 requires_grad: bool = True) -> QuantizedWeight:
    data = torch.full((), math.nan, dtype=dtype, device=device).expand(shape)
    return QuantizedWeight(data, requires_grad=requires_grad, module=module)


class QuantizedWeight(nn.Parameter):
    """A float Parameter standing for a quantized weight: right shape and dtype, one element of storage.

    Its value is NaN everywhere (reading it is a bug); its ``.grad`` is the real
    float gradient. ``lrgrad_codec`` is the owning :class:`QuantizedLinear`.
    """

    def __new__(cls, data: torch.Tensor, requires_grad: bool = True, module: QuantizedLinear | None = None):
        handle = super().__new__(cls, data, requires_grad)
        handle._codec_ref = weakref.ref(module) if module is not None else None
        return handle

    @property
    def lrgrad_codec(self) -> QuantizedLinear | None:
        ref = getattr(self, "_codec_ref", None)
        return ref() if ref is not None else None

    def __deepcopy__(self, memo: dict[int, Any]) -> QuantizedWeight:
        if id(self) in memo:
            return memo[id(self)]
        module = self.lrgrad_codec
        new_module = copy.deepcopy(module, memo) if module is not None else None
        if id(self) in memo:  # copying the module copied this handle
            return memo[id(self)]
        result = _make_handle(self.shape, self.dtype, self.device, new_module, self.requires_grad)
        memo[id(self)] = result
        return result

    def __reduce_ex__(self, proto: int) -> Any:
        raise TypeError("QuantizedWeight handles are not picklable; save the model's state_dict instead")

    def __repr__(self) -> str:
        return f"QuantizedWeight(shape={tuple(self.shape)}, dtype={self.dtype})"


class _QuantizedLinearFunction(torch.autograd.Function):
    """``y = x W^T`` with ``W`` dequantized on the fly (never stored); ``dW = g^T x`` goes to the handle."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, handle: torch.Tensor, module: QuantizedLinear) -> torch.Tensor:
        # keep references to the code tensors of *this* forward (requantize_ assigns new ones)
        packed = (module.codes, module.scale, module.zero)
        weight = module._dequantize_from(*packed, dtype=x.dtype)
        ctx.module = module
        ctx.packed = packed
        ctx.save_for_backward(x)
        ctx.handle_dtype = handle.dtype
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        (x,) = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ ctx.module._dequantize_from(*ctx.packed, dtype=grad_out.dtype)
        if ctx.needs_input_grad[1]:
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            grad_w = (g2.t() @ x.reshape(-1, x.shape[-1]).to(g2.dtype)).to(ctx.handle_dtype)
        return grad_x, grad_w, None


class QuantizedLinear(nn.Linear):
    """``nn.Linear`` whose weight is stored as INT8 (or packed INT4) codes with per-group fp16 scale/zero.

    Build with :meth:`from_linear` or :func:`quantize_weights`. ``rounding="nearest"``
    requantizes with round-to-nearest instead of stochastic rounding (to show why the
    latter is needed: with a small lr, updates below half a step are lost).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 8,
                 group_size: int = 256, rounding: str = "stochastic", seed: int = 0,
                 device: Any = None, dtype: torch.dtype | None = None):
        nn.Module.__init__(self)  # not nn.Linear.__init__: no float weight is ever allocated
        _check_bits(bits)
        check_int("group_size", group_size, 1)
        if rounding not in ROUNDING_MODES:
            raise ValueError(f"Invalid rounding: {rounding!r}; expected one of {ROUNDING_MODES}")
        dtype = dtype or torch.get_default_dtype()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.rounding = bits, group_size, rounding
        self.levels = 2**bits - 1
        numel = in_features * out_features
        self.groups_per_row = -(-in_features // group_size)  # the last one shorter when group_size does not divide
        groups = out_features * self.groups_per_row
        if bits == 8:
            codes = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        else:
            codes = torch.zeros(-(-numel // 2), dtype=torch.uint8, device=device)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", torch.ones(groups, dtype=torch.float16, device=device))
        self.register_buffer("zero", torch.zeros(groups, dtype=torch.float16, device=device))
        self.register_buffer("rounding_seed", torch.tensor(int(seed), dtype=torch.int64, device=device))
        self.register_buffer("rounding_step", torch.tensor(0, dtype=torch.int64, device=device))
        self.weight = _make_handle(torch.Size((out_features, in_features)), dtype, codes.device, self)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 8, group_size: int = 256, rounding: str = "stochastic",
                    seed: int = 0) -> QuantizedLinear:
        if not isinstance(linear, nn.Linear) or isinstance(linear, QuantizedLinear):
            raise TypeError(f"Invalid module: expected an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, bits=bits,
                     group_size=group_size, rounding=rounding, seed=seed, device=weight.device, dtype=weight.dtype)
        module.weight.requires_grad_(weight.requires_grad)
        with torch.no_grad():
            module.set_weight_(weight.detach(), stochastic=False)
            if linear.bias is not None:
                module.bias.copy_(linear.bias)
                module.bias.requires_grad_(linear.bias.requires_grad)
        return module

    # ------------------------------------------------------------------ codes
    @property
    def compute_dtype(self) -> torch.dtype:
        return self.weight.dtype

    def _to_groups(self, rows: torch.Tensor) -> torch.Tensor:
        """``(out, in)`` values as ``(groups, group_size)``: each row cut into ``groups_per_row`` groups,
        a shorter last group padded with the row's last element (its min and max are unchanged, so
        the grid is the one of the real elements; the padding is dropped by :meth:`_from_groups`)."""
        pad = self.groups_per_row * self.group_size - self.in_features
        if pad:
            rows = torch.cat([rows, rows[:, -1:].expand(rows.shape[0], pad)], dim=1)
        return rows.reshape(-1, self.group_size)

    def _from_groups(self, groups: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`_to_groups`: ``(out, in)``, the padding dropped."""
        rows = groups.reshape(self.out_features, self.groups_per_row * self.group_size)
        return rows[:, : self.in_features] if rows.shape[1] != self.in_features else rows

    def _q_from(self, codes: torch.Tensor) -> torch.Tensor:
        """Integer codes q in [0, levels] as fp32, shape (groups, group_size)."""
        if self.bits == 8:
            q = codes.to(torch.float32) + 128.0
        else:
            q = unpack_int4(codes, self.in_features * self.out_features).to(torch.float32)
        return self._to_groups(q.view(self.out_features, self.in_features))

    def _encode(self, q: torch.Tensor) -> torch.Tensor:
        q = self._from_groups(q)
        if self.bits == 8:
            return (q - 128.0).to(torch.int8).reshape(self.out_features, self.in_features)
        return pack_int4(q.to(torch.uint8).reshape(-1))

    def _dequantize_from(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = self._q_from(codes)
        w = scale.float()[:, None] * (q - zero.float()[:, None])
        return self._from_groups(w).to(dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a dense tensor (``dtype`` defaults to the compute dtype)."""
        return self._dequantize_from(self.codes, self.scale, self.zero, dtype or self.compute_dtype)

    def dequantize_for_update(self) -> torch.Tensor:
        """Codec hook for optimizers: an fp32 (fp64 for fp64 handles) work copy to update in place."""
        dtype = torch.float64 if self.compute_dtype == torch.float64 else torch.float32
        return self.dequantize(dtype)

    def _next_seed(self) -> int:
        seed = (int(self.rounding_seed) * 1_000_003 + int(self.rounding_step)) % (2**62)
        self.rounding_step.add_(1)
        return seed

    @torch.no_grad()
    def set_weight_(self, weight: torch.Tensor, stochastic: bool = False) -> None:
        """Quantize ``weight`` on fresh grids (used at conversion)."""
        groups = self._to_groups(weight.reshape(self.out_features, self.in_features).float())
        scale, zero = build_grid(groups, self.levels)
        y = groups / scale.float()[:, None] + zero.float()[:, None]
        q = stochastic_round(y, self._next_seed()) if stochastic else torch.round(y)
        self.codes = self._encode(q.clamp_(0, self.levels))
        self.scale, self.zero = scale, zero

    @torch.no_grad()
    def requantize_(self, work: torch.Tensor) -> None:
        """Codec hook for optimizers: store the updated ``work`` weight (from :meth:`dequantize_for_update`).

        Groups whose values still fit their grid keep it: ``y = q_old + (w - dequant(q_old)) / scale``,
        exactly ``q_old`` where the update is zero. Other groups get a new grid. ``y`` is then
        rounded stochastically (``rounding="stochastic"``) or to nearest.
        """
        if work.shape != self.weight.shape:
            raise ValueError(f"Invalid work: shape {tuple(work.shape)}, expected {tuple(self.weight.shape)}")
        groups = self._to_groups(work.float())
        q_old = self._q_from(self.codes)
        scale, zero = self.scale.float()[:, None], self.zero.float()[:, None]
        old = scale * (q_old - zero)  # same expression as _dequantize_from: bit-equal to the work copy's start
        y = q_old + (groups - old) / scale
        outside = (y.amin(dim=1) < 0) | (y.amax(dim=1) > self.levels)
        new_scale, new_zero = self.scale, self.zero
        if bool(outside.any()):
            idx = outside.nonzero().squeeze(1)
            s, z = build_grid(groups[idx], self.levels)
            new_scale, new_zero = self.scale.clone(), self.zero.clone()
            new_scale[idx], new_zero[idx] = s, z
            y[idx] = groups[idx] / s.float()[:, None] + z.float()[:, None]
        seed = self._next_seed()
        q = stochastic_round(y, seed) if self.rounding == "stochastic" else torch.round(y)
        self.codes = self._encode(q.clamp_(0, self.levels))
        self.scale, self.zero = new_scale, new_zero

    # ------------------------------------------------------------------ module
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _QuantizedLinearFunction.apply(x, self.weight, self)
        return out + self.bias if self.bias is not None else out

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the dequantized weight (compute dtype)."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                           device=self.codes.device, dtype=self.compute_dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dequantize())
            linear.weight.requires_grad_(self.weight.requires_grad)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
                linear.bias.requires_grad_(self.bias.requires_grad)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}, rounding={self.rounding}")

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # the handle holds no data: codes/scale/zero (+ rounding generator) are the weight
        for name, param in self._parameters.items():
            if name != "weight" and param is not None:
                destination[prefix + name] = param if keep_vars else param.detach()
        for name, buf in self._buffers.items():
            if buf is not None and name not in self._non_persistent_buffers_set:
                destination[prefix + name] = buf if keep_vars else buf.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        params = list(self._parameters.items())
        self._parameters.pop("weight")
        try:
            super()._load_from_state_dict(state_dict, prefix, *args)
        finally:
            self._parameters.clear()
            self._parameters.update(params)  # same order: optimizers index params by position

    def _apply(self, fn: Any, recurse: bool = True) -> QuantizedLinear:
        # Move the handle and the codes without materialising a dense weight, and never cast the
        # fp16 scale/zero (bf16 would not hold the zero points exactly) or the codes.
        handle = self._parameters["weight"]
        params = list(self._parameters.items())
        kept = {k: self._buffers.pop(k) for k in ("codes", "scale", "zero", "rounding_seed", "rounding_step")}
        self._parameters.pop("weight")
        try:
            super()._apply(fn, recurse)
        finally:
            probe = fn(torch.zeros((), dtype=handle.dtype, device=handle.device))
            for k, v in kept.items():
                self._buffers[k] = v.to(probe.device)
            new = torch.full((), math.nan, dtype=probe.dtype, device=probe.device).expand(handle.shape)
            handle.data = new
            if handle.grad is not None:
                handle.grad = fn(handle.grad)
            bias = self._parameters.get("bias")
            self._parameters.clear()
            self._parameters.update(params)
            self._parameters["bias"] = bias
        return self


# ---------------------------------------------------------------------- validation
def _check_bits(bits: Any) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"Invalid bits: expected an int (4 or 8), got {type(bits).__name__} ({bits!r})")
    if bits not in (4, 8):
        raise ValueError(f"Invalid bits: {bits}; expected 4 or 8")



#: kept in full precision by default (as ``lrgrad.param_groups`` keeps them full-rank)
DEFAULT_EXCLUDE = ("lm_head", "embed_tokens", "embed_in", "embed_out", "wte", "wpe", "output", "classifier")


#: why INT8 weights are single-process (the text of the refusals below and of ``setup_parallel``'s)
SINGLE_PROCESS_REASON = (
    "INT8 weights (lrgrad.quantize_weights) are single-process: the weight Parameter is a stride-0 handle, "
    "which DDP cannot broadcast or all-reduce and FSDP2 cannot shard, and a data-parallel wrapper built "
    "before the quantization keeps reducing the replaced float weights, so every rank would train its own "
    "INT8 weights from its local gradient"
)


def check_single_process(model: nn.Module) -> None:
    """Refuse a data-parallel ``model`` (DDP-wrapped, FSDP2-sharded) for INT8 weights; warn when
    ``torch.distributed`` runs several processes, where a wrapper around ``model`` cannot be seen."""
    import torch.distributed as dist

    from lrgrad.dtensor import is_dtensor

    wrappers: tuple[type, ...] = (nn.parallel.DistributedDataParallel,)
    if dist.is_available():
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

        wrappers += (FSDPModule, FullyShardedDataParallel)
    wrapper = next((type(m).__name__ for m in model.modules() if isinstance(m, wrappers)), None)
    if wrapper is None and any(is_dtensor(p) for p in model.parameters()):
        wrapper = "DTensor parameters (FSDP2 / tensor parallel)"
    if wrapper is not None:
        raise ValueError(f"Invalid model: it is data-parallel ({wrapper}); {SINGLE_PROCESS_REASON}")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        warnings.warn(f"quantize_weights under torch.distributed with {dist.get_world_size()} processes: "
                      f"{SINGLE_PROCESS_REASON}. Run INT8 weights in one process per model.",
                      UserWarning, stacklevel=3)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantize_weights(
    model: nn.Module,
    bits: int = 8,
    group_size: int = 256,
    target_modules: str | Sequence[str] = "all-linear",
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    *,
    rounding: str = "stochastic",
    seed: int = 0,
) -> nn.Module:
    """Replace the chosen ``nn.Linear`` modules of ``model`` (in place) by :class:`QuantizedLinear`.

    Args:
        bits: 8 (INT8 codes) or 4 (packed INT4 codes).
        group_size: elements per (scale, zero) group, taken along rows; a row length it does not
            divide ends in a shorter group (as ``lrgrad.estimate_memory(weight_bits=...)`` counts it).
        target_modules: ``"all-linear"`` or name patterns (exact name, dotted suffix, glob);
            every module matched by a pattern must be an ``nn.Linear``.
        exclude: name patterns left in full precision (the output head and embeddings by default).
        rounding: ``"stochastic"`` (Q-GaLore) or ``"nearest"``.
        seed: base seed of the per-layer rounding generators (layer ``i`` uses ``seed + i``).

    Returns ``model``. Build the optimizer (and ``lrgrad.param_groups``) *after* this call:
    the weights become new Parameter handles. Linear layers whose weight is shared with
    another module (tied output heads) are skipped by ``"all-linear"`` and refused by name.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model: expected an nn.Module, got {type(model).__name__}")
    check_single_process(model)
    _check_bits(bits)
    check_int("group_size", group_size, 1)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"Invalid seed: {seed!r} (expected an int >= 0)")
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"Invalid rounding: {rounding!r}; expected one of {ROUNDING_MODES}")
    if isinstance(target_modules, str):
        if target_modules != "all-linear":
            raise ValueError(f"Invalid target_modules: {target_modules!r}; expected 'all-linear' or a list of names")
    elif not isinstance(target_modules, Sequence) or not all(isinstance(t, str) for t in target_modules):
        raise TypeError("Invalid target_modules: expected 'all-linear' or a list of str patterns")
    if isinstance(exclude, str) or not all(isinstance(t, str) for t in exclude):
        raise TypeError("Invalid exclude: expected a list of str patterns")
    owners: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    chosen: list[tuple[str, nn.Linear]] = []
    for name, module in model.named_modules():
        if not name or matches(name, exclude) or isinstance(module, QuantizedLinear):
            continue
        if target_modules == "all-linear":
            if isinstance(module, nn.Linear) and owners.get(id(module.weight), 0) == 1:
                chosen.append((name, module))
            continue
        if not matches(name, target_modules):
            continue
        if not isinstance(module, nn.Linear):
            if not any(isinstance(m, nn.Linear) for m in module.modules()):
                raise TypeError(f"Invalid target_modules: {name!r} is a {type(module).__name__}, not an nn.Linear")
            continue  # a container whose name matched; its Linear children match the same pattern
        if owners.get(id(module.weight), 0) > 1:
            raise ValueError(f"Invalid target_modules: {name!r} shares its weight with another module (tied)")
        chosen.append((name, module))
    if not chosen:
        raise ValueError(f"Invalid target_modules: {target_modules!r} matched no nn.Linear module")
    # one layer at a time, each original dropped as soon as its codes exist: the conversion never holds
    # more than the model plus one layer's fp32 quantization temporaries
    chosen.reverse()
    del module
    for i in range(len(chosen)):
        name, linear = chosen.pop()
        _set_module(model, name, QuantizedLinear.from_linear(linear, bits, group_size, rounding, seed + i))
        del linear
    return model


def dequantize_weights(model: nn.Module) -> nn.Module:
    """Replace every :class:`QuantizedLinear` of ``model`` (in place) by a plain ``nn.Linear``; returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"Invalid model: expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, QuantizedLinear):
        return model.to_linear()
    names = [name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    for name in names:
        _set_module(model, name, model.get_submodule(name).to_linear())
    return model


def quantized_modules(model: nn.Module) -> list[tuple[str, QuantizedLinear]]:
    """The ``(name, module)`` pairs of the quantized linear layers of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]


# ---------------------------------------------------------------------------- the optimizers' write path
@contextmanager
def update_targets(params: Sequence[torch.Tensor], contiguous: bool = False) -> Iterator[list[torch.Tensor]]:
    """The tensors an optimizer writes its update into, one per param, written back on exit.

    * a quantized weight (``weight.lrgrad_codec``): an fp32 (fp64) dequantized work copy,
      requantized with the codec's rounding on exit;
    * with ``contiguous=True``, a non-contiguous param: a contiguous work copy, copied back
      (so the optimizer may ``view`` it as a matrix);
    * any other param: the param itself.

    On an exception inside the block nothing is written back.
    """
    targets: list[torch.Tensor] = []
    for p in params:
        codec = getattr(p, "lrgrad_codec", None)
        if codec is not None:
            targets.append(codec.dequantize_for_update())
        elif contiguous and not p.is_contiguous():
            targets.append(p.clone(memory_format=torch.contiguous_format))
        else:
            targets.append(p)
    yield targets
    for p, target in zip(params, targets):
        if target is p:
            continue
        codec = getattr(p, "lrgrad_codec", None)
        if codec is not None:
            codec.requantize_(target)
        else:
            p.copy_(target)


__all__ = ["QuantizedLinear", "QuantizedWeight", "dequantize_weights", "quantize_weights", "quantized_modules",
           "update_targets"]
