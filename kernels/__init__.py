"""lrgrad.kernels: one entry point per hot operation, dispatched by device.

Every operation has a plain torch reference (``lrgrad.kernels.reference``).
Fast paths (Triton, on CUDA tensors when triton imports) sit behind the same
functions; ``LRGRAD_KERNELS=torch|triton|auto`` forces a backend for tests and
benchmarks. Optimizers call only these functions.
"""

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
