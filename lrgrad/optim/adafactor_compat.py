"""The keyword arguments of ``transformers.Adafactor`` / galore-torch's ``GaLoreAdafactor``,
translated for lrgrad's Adafactor presets.

transformers: ``Adafactor(params, lr=None, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8,
beta1=None, weight_decay=0.0, scale_parameter=True, relative_step=True, warmup_init=False)``.

* same meaning here: ``clip_threshold``, ``beta1``, ``weight_decay``, ``decay_rate`` (= lrgrad's
  ``beta2_decay``: β2_t = 1 - t^decay_rate), ``eps=(eps1, eps2)`` (eps1 is the ε added to g²;
  eps2 only bounds the parameter scale of ``scale_parameter=True``);
* not supported, each refused with what to write instead: ``relative_step=True`` (lr =
  min(1e-2, 1/sqrt(t)) — use a float ``lr`` and an LR scheduler), ``scale_parameter=True`` (lr
  times the parameter RMS — inside a projector the step size is ``lr·scale``), ``warmup_init=True``
  (part of the relative step), ``lr=None`` (means the relative step). galore-torch's own
  examples pass ``relative_step=False, scale_parameter=False, warmup_init=False``, which work.
"""

from __future__ import annotations

from typing import Any

TRANSFORMERS_ONLY = ("decay_rate", "scale_parameter", "relative_step", "warmup_init")


def translate_adafactor_kwargs(
    lr: Any, eps: Any, beta2_decay: float, options: dict[str, Any]
) -> tuple[Any, Any, float]:
    """Pop the transformers-only keys from ``options`` and return ``(lr, eps, beta2_decay)``;
    ``ValueError`` for a setting lrgrad does not implement, naming the replacement."""
    for key in ("scale_parameter", "relative_step", "warmup_init"):
        if key in options and not isinstance(options[key], bool):
            raise TypeError(f"Invalid {key}: expected a bool, got {options[key]!r}")
    if options.pop("relative_step", False):
        raise ValueError(
            "Invalid relative_step: True (transformers' lr = min(1e-2, 1/sqrt(step))) is not supported; pass "
            "relative_step=False with a float lr (e.g. lr=1e-2) and an LR scheduler for the decay "
            "(e.g. transformers.get_inverse_sqrt_schedule)"
        )
    if options.pop("scale_parameter", False):
        raise ValueError(
            "Invalid scale_parameter: True (lr multiplied by the parameter's RMS) is not supported; pass "
            "scale_parameter=False - the step size is lr (times scale inside a projector)"
        )
    if options.pop("warmup_init", False):
        raise ValueError(
            "Invalid warmup_init: True belongs to transformers' relative step, which is not supported; pass "
            "warmup_init=False and use an LR scheduler with warmup "
            "(e.g. transformers.get_constant_schedule_with_warmup)"
        )
    if lr is None:
        raise ValueError(
            "Invalid lr: None (transformers' relative step) is not supported; pass a float lr, e.g. lr=1e-2"
        )
    if "decay_rate" in options:
        decay_rate = options.pop("decay_rate")
        if beta2_decay != -0.8 and beta2_decay != decay_rate:
            raise ValueError(
                f"Invalid decay_rate: {decay_rate!r} conflicts with beta2_decay={beta2_decay!r} (the same setting; "
                "pass one)"
            )
        beta2_decay = decay_rate
    if isinstance(eps, (tuple, list)):
        if len(eps) != 2:
            raise ValueError(f"Invalid eps: expected a float or transformers' (eps1, eps2) pair, got {eps!r}")
        eps = eps[0]  # eps2 only bounds the parameter scale of scale_parameter=True
    return lr, eps, beta2_decay
