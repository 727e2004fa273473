"""lrgrad.kernels: one entry point per hot operation, dispatched by device.

Every operation has a plain torch reference (``lrgrad.kernels.reference``).
Fast paths (Triton, on CUDA tensors when triton imports) sit behind the same
functions; ``LRGRAD_KERNELS=torch|triton|auto`` forces a backend for tests and
benchmarks. Optimizers call only these functions.
"""

if __name__ == "kernels":
    # Imported as a top-level ``kernels``: the repository root is on sys.path (``python``, ``python -c``,
    # ``python -m`` or a notebook started there) and this folder shadows the package that owns the name,
    # Hugging Face's ``kernels``, which transformers imports when it builds a model. Hand the import to that
    # package (found on sys.path without the root), so the user's ``import transformers`` works there too;
    # with none installed, say what happened instead of a confusing error from deep inside transformers.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.realpath(p or ".") != _root])
    if _spec is None or _spec.loader is None:
        raise ImportError(
            f"`import kernels` found lrgrad's kernels/ folder because {_root} is on sys.path; that folder is "
            "imported as `lrgrad.kernels`, and no other package named `kernels` is installed", name="kernels")
    _module = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds after this body
    try:
        _spec.loader.exec_module(_module)
    except BaseException:
        del _sys.modules["kernels"]
        raise
else:
    from lrgrad.kernels.adamw import adamw_directions_, adamw_step_, adamw_step_reference_, fused_adamw_applies
    from lrgrad.kernels.channel_scale import channel_scale_update_, channel_sumsq
    from lrgrad.kernels.dispatch import backend_for
    from lrgrad.kernels.newton_schulz import newton_schulz
    from lrgrad.kernels.normalize import auon_normalize
    from lrgrad.kernels.projection import adam_direction_, lowrank_update_, project_down, project_up
    from lrgrad.kernels.quantization import (
        dequantize_blockwise_8bit,
        dequantize_int4,
        dequantize_int8,
        quantize_blockwise_8bit,
        quantize_int4,
        quantize_int8,
        stochastic_round,
    )

__all__ = [
    "adam_direction_",
    "adamw_directions_",
    "adamw_step_",
    "adamw_step_reference_",
    "auon_normalize",
    "backend_for",
    "channel_scale_update_",
    "channel_sumsq",
    "dequantize_blockwise_8bit",
    "dequantize_int4",
    "dequantize_int8",
    "fused_adamw_applies",
    "lowrank_update_",
    "newton_schulz",
    "project_down",
    "project_up",
    "quantize_blockwise_8bit",
    "quantize_int4",
    "quantize_int8",
    "stochastic_round",
]
