"""Quantization numerics: specs, dyadic arithmetic, observers, weight quantization."""

from qcompile.numerics.dyadic import (
    MultiplierRangeError,
    quantize_multiplier,
    requantize,
    rounding_shift,
)
from qcompile.numerics.specs import (
    SCALE_EPS,
    QuantSpec,
    choose_qparams,
    compute_qparams,
    dequantize,
    dynamic_per_token_qparams,
    expand_qparam,
    fake_quantize,
    pack_int4,
    quantize,
    reduce_min_max,
    unpack_int4,
    weight_spec,
)

__all__ = [
    "SCALE_EPS",
    "MultiplierRangeError",
    "QuantSpec",
    "choose_qparams",
    "compute_qparams",
    "dequantize",
    "dynamic_per_token_qparams",
    "expand_qparam",
    "fake_quantize",
    "pack_int4",
    "quantize",
    "quantize_multiplier",
    "reduce_min_max",
    "requantize",
    "rounding_shift",
    "unpack_int4",
    "weight_spec",
]
