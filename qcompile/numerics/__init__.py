"""Quantization numerics: specs, dyadic arithmetic, observers, weight quantization."""

from qcompile.numerics.dyadic import (
    MultiplierRangeError,
    quantize_multiplier,
    requantize,
    rounding_shift,
)

__all__ = ["MultiplierRangeError", "quantize_multiplier", "requantize", "rounding_shift"]
