"""Quantization specs and the one set of pure quantize / dequantize functions.

Everything that turns floats into integers (observers, weight quantizers, fake-quant in
graphs, references for kernels) goes through the functions here, so that the simulated
path and the integer kernels agree on ranges, rounding and storage layout.

int4 storage: int8 tensors holding values in [-8, 7] until `pack_int4` packs two of them
per byte for the kernels.
"""

from __future__ import annotations

import torch

# ---------------------------------------------------------------------------------------
# int4 packing (the layout the Triton kernels read)
# ---------------------------------------------------------------------------------------


def pack_int4(x: torch.Tensor) -> torch.Tensor:
    """Pack signed 4-bit values, two per byte, along the LAST dimension.

    x: int8 [..., K] with values in [-8, 7], K even  ->  uint8 [..., K // 2] where
    byte i = (x[2i] & 0xF) | ((x[2i+1] & 0xF) << 4): element 2i in the low nibble, 2i+1 in
    the high nibble, both two's complement. K is the input (reduction) dim of a weight
    [N, K], so a kernel unpacks along the dim it reduces over.
    """
    if x.dtype != torch.int8:
        raise TypeError(f"pack_int4 takes an int8 tensor of int4 values, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] % 2 != 0:
        raise ValueError(
            f"pack_int4 needs an even last dimension (two values per byte), got shape "
            f"{tuple(x.shape)}"
        )
    if x.numel() and (int(x.min()) < -8 or int(x.max()) > 7):
        raise ValueError(
            f"pack_int4 values must lie in [-8, 7], got [{int(x.min())}, {int(x.max())}]"
        )
    u = x.to(torch.int16) & 0xF  # two's-complement nibble, as a non-negative int
    lo, hi = u[..., 0::2], u[..., 1::2]
    return (lo | (hi << 4)).to(torch.uint8)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: uint8 [..., K // 2] -> int8 [..., K] with values in [-8, 7]."""
    if p.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 takes a uint8 tensor of packed int4 pairs, got {p.dtype}")
    if p.dim() == 0:
        raise ValueError("unpack_int4 needs at least one dimension")
    u = p.to(torch.int16)
    lo, hi = u & 0xF, (u >> 4) & 0xF
    # Sign-extend a nibble: 8..15 stand for -8..-1.
    lo = lo - ((lo & 0x8) << 1)
    hi = hi - ((hi & 0x8) << 1)
    out = torch.stack((lo, hi), dim=-1)  # [..., K // 2, 2]
    return out.reshape(*p.shape[:-1], p.shape[-1] * 2).to(torch.int8)
