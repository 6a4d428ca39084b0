"""Quantization specs and the one set of pure quantize / dequantize functions.

Everything that turns floats into integers (observers, weight quantizers, fake-quant in
graphs, references for kernels) goes through the functions here, so that the simulated
path and the integer kernels agree on ranges, rounding and storage layout.

int4 storage: int8 tensors holding values in [-8, 7] until `pack_int4` packs two of them
per byte for the kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qcompile.numerics import _checks

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
    _checks.tensor("pack_int4", "x", x)
    if x.dtype != torch.int8:
        raise TypeError(f"pack_int4: x must be an int8 tensor of int4 values, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] % 2 != 0:
        raise ValueError(
            f"pack_int4: x needs an even last dimension (two values per byte), got shape "
            f"{tuple(x.shape)}"
        )
    _checks.has_data("pack_int4", "x", x)  # values are checked: a weight, packed once
    if x.numel() and (int(x.min()) < -8 or int(x.max()) > 7):
        raise ValueError(
            f"pack_int4: x values must lie in [-8, 7], got [{int(x.min())}, {int(x.max())}]"
        )
    u = x.to(torch.int16) & 0xF  # two's-complement nibble, as a non-negative int
    lo, hi = u[..., 0::2], u[..., 1::2]
    return (lo | (hi << 4)).to(torch.uint8)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: uint8 [..., K // 2] -> int8 [..., K] with values in [-8, 7]."""
    _checks.tensor("unpack_int4", "p", p)
    if p.dtype != torch.uint8:
        raise TypeError(f"unpack_int4: p must be a uint8 tensor of packed int4 pairs, got "
                        f"{p.dtype}")
    if p.dim() == 0:
        raise ValueError("unpack_int4: p needs at least one dimension")
    u = p.to(torch.int16)
    lo, hi = u & 0xF, (u >> 4) & 0xF
    # Sign-extend a nibble: 8..15 stand for -8..-1.
    lo = lo - ((lo & 0x8) << 1)
    hi = hi - ((hi & 0x8) << 1)
    out = torch.stack((lo, hi), dim=-1)  # [..., K // 2, 2]
    return out.reshape(*p.shape[:-1], p.shape[-1] * 2).to(torch.int8)


# ---------------------------------------------------------------------------------------
# QuantSpec
# ---------------------------------------------------------------------------------------

GRANULARITIES = ("per_tensor", "per_channel", "per_token", "per_group")

# Smallest scale compute_qparams returns (the float32 machine epsilon, as PyTorch's
# observers use): an all-zero tensor or channel still gets a finite, invertible scale.
SCALE_EPS = float(torch.finfo(torch.float32).eps)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    Integer range (both modes): the full signed range [-2**(b-1), 2**(b-1) - 1].
      symmetric:  zero_point = 0, scale = absmax / (2**(b-1) - 1). Observed values map into
                  [-qmax, qmax]; the extra code qmin = -2**(b-1) is only reached by values
                  beyond the calibrated range (they clamp to it rather than to -qmax).
      asymmetric: scale = (max - min) / (qmax - qmin) over a range stretched to include 0,
                  zero_point = qmin - round(min / scale), in [qmin, qmax], so 0.0 is exact.
    Granularity and the shape of scale / zero_point for x [..., K]:
      per_tensor:  []                         one pair for the tensor
      per_channel: [x.shape[axis]]            axis 0 of a weight [N, K] = output channels
      per_token:   x.shape[:-1]               one pair per row (all dims but the last)
      per_group:   x.shape[:-1] + (K // g,)   groups of group_size along the last dim
    Storage: int8 tensors for every bits <= 8 (int4 values in [-8, 7] until pack_int4).
    group_levels (per_group weights only): every group's scale is its row's scale times
      an integer in 1..group_levels, so that q (asymmetric: q - zero_point) times that
      integer is the weight's integer value at one scale per row: a group-wise weight whose
      GEMM keeps one int32 accumulator per output and one dyadic requantization per row
      (integer-only recipes). The products must be int8 values: group_levels at most
      max_group_levels (16 for symmetric int4, 8 for asymmetric int4).
    """

    bits: int = 8
    symmetric: bool = True
    granularity: str = "per_tensor"
    group_size: int | None = None
    axis: int = 0  # only for per_channel: the channel axis of the quantized tensor
    group_levels: int | None = None

    def __post_init__(self):
        fn = "QuantSpec"
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise TypeError(f"{fn}: bits must be an int in 2..8, got {self.bits!r}")
        if not 2 <= self.bits <= 8:
            raise ValueError(f"{fn}: bits must be in 2..8 (int8 storage), got {self.bits}")
        _checks.bool_arg(fn, "symmetric", self.symmetric)
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"{fn}: unknown granularity {self.granularity!r}; known: "
                f"{', '.join(GRANULARITIES)}"
            )
        _checks.int_arg(fn, "axis", self.axis)
        if self.granularity == "per_group":
            if self.group_size is None:
                raise ValueError(f"{fn}: per_group needs a positive group_size, got None")
            _checks.int_arg(fn, "group_size", self.group_size, lo=1)
        elif self.group_size is not None:
            raise ValueError(
                f"{fn}: group_size is only meaningful for per_group, not {self.granularity}"
            )
        if self.group_levels is not None:
            _checks.int_arg(fn, "group_levels", self.group_levels, lo=1)
            if self.granularity != "per_group":
                raise ValueError(f"{fn}: group_levels belongs to per_group specs, not "
                                 f"{self.granularity}")
            if self.group_levels > self.max_group_levels:
                raise ValueError(
                    f"{fn}: group_levels {self.group_levels} times the "
                    f"{'values' if self.symmetric else 'values less their zero points'} "
                    f"leaves int8; at most {self.max_group_levels} for "
                    f"{'' if self.symmetric else 'asymmetric '}{self.bits}-bit values")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def max_group_levels(self) -> int:
        """The largest group_levels whose products stay int8: q * m for symmetric values
        (qmin * m >= -128), (q - zero_point) * m for asymmetric ones, |q - z| <= qmax - qmin."""
        if self.symmetric:
            return 128 // -self.qmin
        return 127 // (self.qmax - self.qmin)


def weight_spec(bits: int = 8, *, group_size: int | None = None, symmetric: bool = True):
    """The usual spec for a linear weight [N, K]: per output channel for 8 bits, group-wise
    (group_size, 128 by default) below 8 bits, where one scale per row loses too much."""
    if group_size is None and bits < 8:
        group_size = 128
    if group_size is None:
        return QuantSpec(bits=bits, symmetric=symmetric, granularity="per_channel", axis=0)
    return QuantSpec(bits=bits, symmetric=symmetric, granularity="per_group", group_size=group_size)


def _check_qparams(fn: str, scale, zero_point, x_shape, spec: QuantSpec):
    """scale: real, finite, > 0; zero_point: integer in [qmin, qmax]; both shaped for x by
    the spec's granularity. Returns both as tensors, expanded to broadcast against x."""
    s = _checks.real(fn, "scale", scale)
    z = _checks.real(fn, "zero_point", zero_point, integral=True)
    s = _expand(fn, "scale", s, x_shape, spec)
    z = _expand(fn, "zero_point", z, x_shape, spec)
    _checks.positive_finite(fn, "scale", s)
    _checks.within(fn, "zero_point", z, spec.qmin, spec.qmax,
                   f" (the {spec.bits}-bit range)")
    return s, z


# ---------------------------------------------------------------------------------------
# Ranges and quantization parameters
# ---------------------------------------------------------------------------------------


def _channel_axis(x_dim: int, spec: QuantSpec) -> int:
    axis = spec.axis + x_dim if spec.axis < 0 else spec.axis
    if not 0 <= axis < x_dim:
        raise ValueError(f"per_channel: spec axis {spec.axis} is out of range for a {x_dim}-d "
                         "tensor")
    return axis


def _grouped(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View x [..., K] as [..., K // g, g]; a clear error when g does not divide K."""
    k, g = x.shape[-1], spec.group_size
    if x.dim() == 0 or k % g != 0:
        raise ValueError(f"per_group: group_size {g} does not divide the last dimension of "
                         f"shape {tuple(x.shape)}")
    return x.reshape(*x.shape[:-1], k // g, g)


def _scale_shape(x_shape: torch.Size, spec: QuantSpec) -> tuple[int, ...]:
    """The shape of the scales the spec's granularity gives a tensor of x_shape."""
    if spec.granularity == "per_tensor":
        return ()
    if spec.granularity == "per_channel":
        return (x_shape[_channel_axis(len(x_shape), spec)],)
    if spec.granularity == "per_token":
        return tuple(x_shape[:-1])
    return tuple(_grouped(torch.empty(x_shape, device="meta"), spec).shape[:-1])


def reduce_min_max(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of x in float32, reduced to the scale shape the spec's granularity defines."""
    _checks.quant_spec("reduce_min_max", spec)
    x = _checks.floating("reduce_min_max", "x", x).detach().float()
    if x.numel() == 0:
        # no scales to choose (per-token parameters of 0 rows): empty parameters; a scale
        # that would cover no element has no range to choose it from
        shape = _scale_shape(x.shape, spec)
        if math.prod(shape) == 0:
            return x.new_empty(shape), x.new_empty(shape)
        raise ValueError("cannot choose quantization parameters for an empty tensor")
    if spec.granularity == "per_tensor":
        return x.amin(), x.amax()
    if spec.granularity == "per_channel":
        axis = _channel_axis(x.dim(), spec)
        flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)  # [C, rest]
        return flat.amin(dim=1), flat.amax(dim=1)
    if spec.granularity == "per_token":
        return x.amin(dim=-1), x.amax(dim=-1)
    g = _grouped(x, spec)  # [..., G, g]
    return g.amin(dim=-1), g.amax(dim=-1)


def compute_qparams(
    min_val: torch.Tensor | float, max_val: torch.Tensor | float, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float32, zero_point int32) from a range; shapes follow min_val / max_val.

    The range is first stretched to include 0 (so 0.0 quantizes exactly, which zero
    padding and ReLU outputs need). scale >= SCALE_EPS always.
    """
    fn = "compute_qparams"
    _checks.quant_spec(fn, spec)
    lo = _checks.real(fn, "min_val", min_val).detach().float()
    hi = _checks.real(fn, "max_val", max_val).detach().to(lo.device, torch.float32)
    if isinstance(min_val, torch.Tensor) and isinstance(max_val, torch.Tensor) and \
            lo.shape != hi.shape:
        raise ValueError(f"{fn}: max_val has shape {tuple(hi.shape)}, min_val "
                         f"{tuple(lo.shape)}: one range per scale, the same shape for both")
    for name, t in (("min_val", lo), ("max_val", hi)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{fn}: quantization range must be finite, but {name} holds inf "
                             "or NaN (the data the range came from had inf or NaN)")
    if bool((lo > hi).any()):
        raise ValueError(f"{fn}: quantization range has min > max: min_val exceeds max_val "
                         "(did the observer see any data?)")
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    if spec.symmetric:
        scale = torch.maximum(-lo, hi) / spec.qmax
        scale = torch.clamp(scale, min=SCALE_EPS)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = (hi - lo) / float(spec.qmax - spec.qmin)
        scale = torch.clamp(scale, min=SCALE_EPS)
        zero_point = spec.qmin - torch.round(lo / scale)
        zero_point = zero_point.clamp(spec.qmin, spec.qmax).to(torch.int32)
    return scale.float(), zero_point


def choose_qparams(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max quantization parameters of x itself (weights, dynamic activations)."""
    _checks.quant_spec("choose_qparams", spec)
    _checks.floating("choose_qparams", "x", x)
    return compute_qparams(*reduce_min_max(x, spec), spec)


def dynamic_per_token_qparams(
    x: torch.Tensor, spec: QuantSpec | None = None, clip: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero_point) of an activation x [..., K], both shaped x.shape[:-1].

    The symmetric case is absmax / qmax per row, which the dynamic-activation kernels
    compute the same way in float32. clip in (0, 1] shrinks the range to clip times
    itself, so the values beyond it saturate at qmin / qmax (QuaRot's 0.9 for int4
    activations): symmetric, scale = max((absmax * clip) / qmax, SCALE_EPS); asymmetric,
    the row's min and max each times clip, then compute_qparams (scale = max((hi - lo) /
    (qmax - qmin), SCALE_EPS), zero_point = clamp(qmin - round(lo / scale))). clip is
    rounded to float32 first, one float32 rounding for each product and one for the
    quotient; clip = 1.0 multiplies exactly: the unclipped qparams, bit for bit.
    """
    fn = "dynamic_per_token_qparams"
    spec = _checks.quant_spec(fn, spec or QuantSpec(granularity="per_token"))
    if spec.granularity != "per_token":
        raise ValueError(f"{fn}: spec must be a per_token spec, got {spec}")
    _checks.floating(fn, "x", x)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0.0 < clip <= 1.0:
        raise ValueError(f"{fn}: clip must be a number in (0, 1] (1.0: no clipping), got "
                         f"{clip!r}")
    # A positive factor commutes with the float32 rounding of max(-lo, hi) and with the
    # clamps to 0, so scaling the float32 range by clip gives compute_qparams'
    # (absmax * clip) / qmax exactly.
    lo, hi = reduce_min_max(x, spec)
    c = torch.tensor(clip, dtype=torch.float32)
    return compute_qparams(lo * c, hi * c, spec)


def expand_qparam(t: torch.Tensor, x_shape: torch.Size | tuple, spec: QuantSpec) -> torch.Tensor:
    """Reshape a scale or zero point of the spec's stored shape to broadcast against x_shape."""
    fn = "expand_qparam"
    return _expand(fn, "t", _checks.real(fn, "t", t), x_shape, _checks.quant_spec(fn, spec))


def _expand(fn: str, name: str, t: torch.Tensor, x_shape, spec: QuantSpec) -> torch.Tensor:
    """expand_qparam of one named parameter: the error names it (scale, zero_point)."""
    ndim = len(x_shape)
    if spec.granularity == "per_tensor":
        if t.numel() != 1:
            raise ValueError(f"{fn}: per_tensor {name} must have one element, got shape "
                             f"{tuple(t.shape)}")
        return t.reshape(())
    if spec.granularity == "per_channel":
        axis = _channel_axis(ndim, spec)
        if t.shape != (x_shape[axis],):
            raise ValueError(
                f"{fn}: per_channel {name} must have shape ({x_shape[axis]},) for axis "
                f"{spec.axis} of {tuple(x_shape)}, got {tuple(t.shape)}"
            )
        return t.reshape([-1 if d == axis else 1 for d in range(ndim)])
    if spec.granularity == "per_token":
        if ndim == 0 or t.shape != tuple(x_shape[:-1]):
            raise ValueError(
                f"{fn}: per_token {name} must have shape {tuple(x_shape[:-1])}, got "
                f"{tuple(t.shape)}"
            )
        return t.unsqueeze(-1)
    k, g = (x_shape[-1] if ndim else 0), spec.group_size
    want = (*x_shape[:-1], k // g) if ndim and k % g == 0 else None
    if want is None or t.shape != want:
        raise ValueError(
            f"{fn}: per_group {name} for {tuple(x_shape)} with group_size {g} must have shape "
            f"{want}, got {tuple(t.shape)}"
        )
    return t.repeat_interleave(g, dim=-1)  # [..., K]: group j covers columns j*g .. j*g+g-1


# ---------------------------------------------------------------------------------------
# quantize / dequantize
# ---------------------------------------------------------------------------------------


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """int8 q = clamp(round(x / scale) + zero_point, qmin, qmax), computed in float32.

    Rounding is torch.round: half to even (what PyTorch and torchao do for float -> int);
    kernels that quantize floats must divide by the float32 scale and round the same way.
    (Integer -> integer requantization is different: dyadic.requantize, ties away from 0.)
    Refused: a non-float x, a scale that is not finite and > 0, a non-integer zero point or
    one outside [qmin, qmax], parameters not shaped for x by the spec's granularity.
    """
    fn = "quantize"
    _checks.floating(fn, "x", x, data=False)
    s, z = _check_qparams(fn, scale, zero_point, x.shape, _checks.quant_spec(fn, spec))
    return _quantize(x, s, z, spec)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    spec: QuantSpec,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(q - zero_point) * scale, computed in float32, returned as dtype (a float dtype).
    q is an integer tensor; the parameters are checked as by `quantize`."""
    fn = "dequantize"
    _checks.integer(fn, "q", q, data=False)
    _check_float_dtype(fn, dtype)
    s, z = _check_qparams(fn, scale, zero_point, q.shape, _checks.quant_spec(fn, spec))
    return _dequantize(q, s, z, dtype)


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
) -> torch.Tensor:
    """dequantize(quantize(x)) in x's dtype: the float simulation of a quantized tensor."""
    fn = "fake_quantize"
    _checks.floating(fn, "x", x, data=False)
    s, z = _check_qparams(fn, scale, zero_point, x.shape, _checks.quant_spec(fn, spec))
    return _dequantize(_quantize(x, s, z, spec), s, z, x.dtype)


def _check_float_dtype(fn: str, dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{fn}: dtype must be a floating-point torch.dtype, got {dtype!r}")


# The arithmetic, on checked parameters already expanded against the tensor.


def _quantize(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, spec: QuantSpec):
    s = s.to(device=x.device, dtype=torch.float32)
    z = z.to(device=x.device, dtype=torch.float32)
    q = torch.round(x.detach().float() / s) + z
    return q.clamp(spec.qmin, spec.qmax).to(torch.int8)


def _dequantize(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, dtype: torch.dtype):
    s = s.to(device=q.device, dtype=torch.float32)
    z = z.to(device=q.device, dtype=torch.float32)
    return ((q.float() - z) * s).to(dtype)
