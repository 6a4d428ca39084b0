"""Quantization numerics: specs, dyadic arithmetic, observers, weight quantization."""

from qcompile.numerics.dyadic import (
    MultiplierRangeError,
    quantize_multiplier,
    requantize,
    rounding_shift,
)
from qcompile.numerics.specs import pack_int4, unpack_int4

__all__ = [
    "MultiplierRangeError",
    "pack_int4",
    "quantize_multiplier",
    "requantize",
    "rounding_shift",
    "unpack_int4",
]
