"""Fewer-pass eager (de)quantization of blockwise 8-bit moments, bit-identical to ``lrgrad.quant``.

``lrgrad.quant.dequantize_blockwise_8bit`` / ``quantize_blockwise_8bit`` are the plain
references (~8 and ~12 passes over the data, plus temporaries). On CPU the 8-bit AdamW
rule spends most of its step there, so this module does the same arithmetic in fewer passes:

* dequantize: a 256-entry table of code values (computed *by the reference* with
  ``absmax = 1``) gathered by the code bytes, times the block's absmax — 3 passes, and
  ``table[c] · absmax`` is exactly the reference's ``value(c) · absmax``;
* quantize: ``|x|`` once, block maxima, then ``|x| / absmax`` → power → levels → round in
  place (and ``copysign`` for the signed map instead of ``round(·) · sign(x)``, equal for
  every finite ``x``). The reference's ``clamp(max=1)`` is skipped: ``|x| ≤ absmax`` and
  IEEE division is correctly rounded, so ``|x| / absmax ≤ 1`` already.

Only whole blocks go through here; a trailing partial block keeps the reference (it is
padded there, and at most one block per tensor). On GPU the Triton kernels of
``lrgrad.kernels`` are used instead.
"""

from __future__ import annotations

import torch

from lrgrad import quant

_TABLES: dict[tuple[bool, torch.device], torch.Tensor] = {}


def code_table(signed: bool, device: torch.device) -> torch.Tensor:
    """fp32 value of every code, indexed by the code's byte (``codes.view(torch.uint8)``)."""
    key = (bool(signed), torch.device(device))
    table = _TABLES.get(key)
    if table is None:
        byte = torch.arange(256, dtype=torch.int32).to(torch.uint8)
        codes = byte.view(torch.int8) if signed else byte
        table = quant.dequantize_blockwise_8bit(codes, torch.ones(1), block_size=256, signed=signed).to(device)
        _TABLES[key] = table
    return table


def dequantize_blocks(codes: torch.Tensor, absmax: torch.Tensor, block_size: int, signed: bool,
                      out: torch.Tensor) -> torch.Tensor:
    """``out`` (fp32, flat) <- the values of flat ``codes`` (a whole number of blocks)."""
    index = codes.view(torch.uint8).to(torch.int32)
    torch.index_select(code_table(signed, codes.device), 0, index, out=out)
    out.view(-1, block_size).mul_(absmax.unsqueeze(1))
    return out


def quantize_blocks(x: torch.Tensor, block_size: int, signed: bool, codes_out: torch.Tensor,
                    absmax_out: torch.Tensor) -> None:
    """Quantize flat fp32 ``x`` (a whole number of blocks) into ``codes_out`` / ``absmax_out``."""
    scaled = x.abs()
    blocks = scaled.view(-1, block_size)
    torch.amax(blocks, dim=1, out=absmax_out)
    safe = torch.where(absmax_out > 0, absmax_out, torch.ones_like(absmax_out))
    blocks.div_(safe.unsqueeze(1))
    if signed:
        scaled.pow_(1.0 / quant.SIGNED_POWER).mul_(quant.SIGNED_LEVELS).round_().copysign_(x)
    else:
        scaled.pow_(1.0 / quant.UNSIGNED_POWER).mul_(quant.UNSIGNED_LEVELS).round_()
    codes_out.copy_(scaled)
