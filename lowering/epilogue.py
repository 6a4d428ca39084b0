"""GEMM epilogues as data: what happens to the int32 accumulator after A @ W^T.

Why data and not code: the same description drives three implementations that must agree
bit for bit (the pure-torch reference, the generated Triton epilogue, the CPU path), and
its `signature()` keys the kernel cache and the autotune cache.

An epilogue is a chain of steps on acc[M, N] = A[M, K] @ W[N, K]^T (int32):

    InputZeroPoint   acc -= zp_term[c]        zp_term = zp_x * colsum(W)[c], int32 [N]
    RowZeroPoint     acc -= row_zero_point[m] * col_sum[c]
                                              per-token zero points of a dynamic asymmetric
                                              A (int32 [M]) times colsum(W) (int32 [N])
    Bias             acc += bias[c]           int32 [N], scale s_x * s_w[c]
    Requantize       y = clamp(round(acc * q / 2**shift) + out_zero_point, qmin, qmax)
                     -> int8; q/shift per tensor (ints) or per channel ([N]); ReLU is
                     qmin = out_zero_point
    Dequantize       y = acc * row_scale[m] * col_scale[c] (+ float_bias[c]) -> fp32/16/bf16

The steps hold only structure; the values (tensors, q, zero points, clamp bounds) are
passed at call time, so one generated kernel serves every layer of the same shape of
computation. Integer steps run in int64 (exact); with no terminal step the output is
the int32 accumulator itself.

Pre: the accumulator range check (reference.check_accumulator_range) passed at compile
time, so |acc + bias - zp_term| <= 2**31 and the dyadic contract applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

FLOAT_OUT_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class InputZeroPoint:
    """Subtract zp_x * colsum(W)[c] (precomputed int32 [N] `zp_term`), for asymmetric A."""

    def tag(self) -> str:
        return "izp"


@dataclass(frozen=True)
class RowZeroPoint:
    """Subtract row_zero_point[m] * col_sum[c]: A quantized per token with a zero point each
    (dynamic asymmetric activations), col_sum the rows' sums of W (int32 [N])."""

    def tag(self) -> str:
        return "rzp"


@dataclass(frozen=True)
class Bias:
    """Add an int32 per-channel bias [N] already in the accumulator's scale s_x * s_w[c]."""

    def tag(self) -> str:
        return "bias"


@dataclass(frozen=True)
class Requantize:
    """Dyadic requantization to int8: `q`, `shift` per tensor (ints) or per channel ([N])."""

    per_channel: bool = False

    def tag(self) -> str:
        return "requant." + ("pc" if self.per_channel else "pt")


@dataclass(frozen=True)
class Dequantize:
    """Float epilogue of the dynamic recipe: acc * row_scale[M] * col_scale[N] (+ bias[N])."""

    out_dtype: str = "float16"
    has_bias: bool = False

    def __post_init__(self) -> None:
        # Accept torch dtypes, store the name: the signature must not depend on repr().
        if isinstance(self.out_dtype, torch.dtype):
            names = {v: k for k, v in FLOAT_OUT_DTYPES.items()}
            if self.out_dtype not in names:
                raise ValueError(f"Dequantize out_dtype must be one of {list(FLOAT_OUT_DTYPES)}")
            object.__setattr__(self, "out_dtype", names[self.out_dtype])
        if self.out_dtype not in FLOAT_OUT_DTYPES:
            raise ValueError(
                f"Dequantize out_dtype must be one of {list(FLOAT_OUT_DTYPES)}, got "
                f"{self.out_dtype!r}"
            )

    def tag(self) -> str:
        return f"dequant.{self.out_dtype}" + ("+fbias" if self.has_bias else "")


Step = InputZeroPoint | RowZeroPoint | Bias | Requantize | Dequantize
_TERMINAL = (Requantize, Dequantize)


@dataclass(frozen=True)
class Epilogue:
    """An ordered chain of steps; validated on construction, hashable, with a stable signature.

    Rules: each step kind at most once; Requantize and Dequantize exclude each other and
    whichever is present comes last (nothing integer can follow a rounding to int8 or a
    conversion to float).
    """

    steps: tuple[Step, ...] = ()

    def __post_init__(self) -> None:
        steps = tuple(self.steps)
        object.__setattr__(self, "steps", steps)
        kinds = [type(s) for s in steps]
        for s in steps:
            if not isinstance(s, (InputZeroPoint, RowZeroPoint, Bias, Requantize, Dequantize)):
                raise TypeError(f"not an epilogue step: {s!r}")
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"each epilogue step may appear once, got {self.describe(steps)}")
        terminal = [i for i, k in enumerate(kinds) if k in _TERMINAL]
        if len(terminal) > 1:
            raise ValueError("Requantize and Dequantize are exclusive: choose int8 or float output")
        if terminal and terminal[0] != len(steps) - 1:
            raise ValueError(
                f"{kinds[terminal[0]].__name__} must be the last step, got {self.describe(steps)}"
            )

    @staticmethod
    def describe(steps: tuple[Step, ...]) -> str:
        return "[" + ", ".join(type(s).__name__ for s in steps) + "]"

    def step(self, kind: type) -> Any:
        """The step of that kind, or None."""
        return next((s for s in self.steps if isinstance(s, kind)), None)

    @property
    def requantize(self) -> Requantize | None:
        return self.step(Requantize)

    @property
    def dequantize(self) -> Dequantize | None:
        return self.step(Dequantize)

    @property
    def integer_only(self) -> bool:
        """No float operation anywhere (int32 or int8 output)."""
        return self.dequantize is None

    @property
    def out_dtype(self) -> torch.dtype:
        if self.requantize is not None:
            return torch.int8
        if self.dequantize is not None:
            return FLOAT_OUT_DTYPES[self.dequantize.out_dtype]
        return torch.int32

    def signature(self) -> str:
        """Stable text naming the computation, e.g. "izp+bias+requant.pc"; "int32" if empty."""
        return "+".join(s.tag() for s in self.steps) or "int32"

    def operand_names(self) -> tuple[str, ...]:
        """The call-time values this epilogue needs (all others must not be passed)."""
        names: list[str] = []
        for s in self.steps:
            if isinstance(s, InputZeroPoint):
                names.append("zp_term")
            elif isinstance(s, RowZeroPoint):
                names += ["row_zero_point", "col_sum"]
            elif isinstance(s, Bias):
                names.append("bias")
            elif isinstance(s, Requantize):
                names += ["q", "shift", "out_zero_point", "qmin", "qmax"]
            elif isinstance(s, Dequantize):
                names += ["row_scale", "col_scale"] + (["float_bias"] if s.has_bias else [])
        return tuple(names)


# Values with defaults: a Requantize step may leave these out.
_DEFAULTS = {"out_zero_point": 0, "qmin": -128, "qmax": 127}


def _vector(name: str, v: Any, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape [{n}], got {type(v).__name__}")
    if v.dtype.is_floating_point != dtype.is_floating_point:
        raise TypeError(f"{name} must be {dtype}, got {v.dtype}")
    if v.numel() != n or v.dim() > 2:
        raise ValueError(f"{name} must have {n} elements (shape [{n}]), got {tuple(v.shape)}")
    if dtype == torch.int32 and v.dtype.itemsize > 4 and v.numel():
        # Narrowing would wrap silently (a data check, but only on a dtype mismatch).
        lo, hi = int(v.min()), int(v.max())
        if lo < -(2**31) or hi >= 2**31:
            raise ValueError(f"{name} does not fit in int32: values in [{lo}, {hi}]")
    return v.reshape(n).to(device=device, dtype=dtype).contiguous()


def _scale(name: str, v: Any, n: int, device: torch.device) -> torch.Tensor:
    # A per-tensor scale becomes a stride-0 view, so kernels need one code path.
    if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1 and n != 1):
        value = float(v)
        return torch.full((1,), value, dtype=torch.float32, device=device).expand(n)
    return _vector(name, v, n, torch.float32, device)


def bind_operands(
    epilogue: Epilogue, m: int, n: int, device: torch.device | str, values: dict[str, Any]
) -> dict[str, Any]:
    """Check and normalise the call-time values for an [M, N] output on `device`.

    Post: integer vectors are contiguous int32 (bias, zp_term, col_sum [N];
    row_zero_point [M]) or int64 (per-channel q, shift [N]); float scales are float32
    [M] / [N] (possibly stride-0 views); scalars are Python ints. Missing or unexpected
    values raise: nothing is ignored.
    """
    device = torch.device(device)
    needed = epilogue.operand_names()
    given = {k: v for k, v in values.items() if v is not None}
    extra = sorted(set(given) - set(needed))
    if extra:
        raise TypeError(
            f"epilogue {epilogue.signature()!r} takes {list(needed)}; unexpected values {extra}"
        )
    missing = [k for k in needed if k not in given and k not in _DEFAULTS]
    if missing:
        raise TypeError(f"epilogue {epilogue.signature()!r} needs values for {missing}")
    out: dict[str, Any] = {}
    for name in needed:
        v = given.get(name, _DEFAULTS.get(name))
        if name in ("bias", "zp_term", "col_sum"):
            out[name] = _vector(name, v, n, torch.int32, device)
        elif name == "row_zero_point":
            out[name] = _vector(name, v, m, torch.int32, device)
        elif name in ("q", "shift"):
            if epilogue.requantize.per_channel:
                out[name] = _vector(name, v, n, torch.int64, device)
            else:
                if isinstance(v, torch.Tensor):
                    if v.numel() != 1:
                        raise ValueError(f"per-tensor {name} must be a scalar, not {v.shape}")
                    v = v.item()
                out[name] = int(v)
        elif name in ("out_zero_point", "qmin", "qmax"):
            out[name] = int(v)
        elif name == "row_scale":
            out[name] = _scale(name, v, m, device)
        elif name == "col_scale":
            out[name] = _scale(name, v, n, device)
        elif name == "float_bias":
            out[name] = _vector(name, v, n, torch.float32, device)
    if "q" in out and not epilogue.requantize.per_channel:
        # Scalars are checked here; per-channel vectors at compile time by
        # reference.check_requant_params (a data check would sync a GPU on every call).
        if not (0 <= out["q"] < 2**31 and 1 <= out["shift"] <= 62):
            raise ValueError(
                f"need 0 <= q < 2**31 and 1 <= shift <= 62, got {out['q']}, {out['shift']}"
            )
    if "qmin" in out:
        if not -128 <= out["qmin"] <= out["qmax"] <= 127:
            raise ValueError(f"need -128 <= qmin <= qmax <= 127, got {out['qmin']}, {out['qmax']}")
    return out
