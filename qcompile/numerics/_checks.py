"""Argument checks of the public numerics functions.

Every check raises TypeError (a wrong type or dtype) or ValueError (a wrong value, shape or
device) whose message names the function and the argument and says what is allowed, so
bad input is refused where it enters, never turned into wrong numbers or an error from
deep inside PyTorch.

Cost: the checks read types, dtypes, shapes and devices, which costs nothing. Only
`positive_finite` and `within` read values, and only of quantization parameters (scales,
zero points, shifts: one reduction over a few elements, one read back); data tensors
(activations, accumulators, weights) are never scanned here. Under torch.compile, and for
fake tensors, value checks are skipped: reading data cannot be traced, and the traced
values were checked where they were made.
"""

from __future__ import annotations

import math
import numbers
import operator

import torch


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "int"


def tensor(fn: str, name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def has_data(fn: str, name: str, t: torch.Tensor) -> torch.Tensor:
    """Not a meta tensor: the function reads its values."""
    if t.device.type == "meta":
        raise ValueError(f"{fn}: {name} is a meta tensor, which holds no values to read; "
                         "pass a tensor on a real device")
    return t


def floating(fn: str, name: str, value, *, data: bool = True) -> torch.Tensor:
    """A real floating-point tensor (float16 / bfloat16 / float32 / float64)."""
    t = tensor(fn, name, value)
    if _kind(t.dtype) != "float":
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {t.dtype}")
    return has_data(fn, name, t) if data else t


def integer(fn: str, name: str, value, *, data: bool = True) -> torch.Tensor:
    """An integer tensor (not bool, not floating point, not complex)."""
    t = tensor(fn, name, value)
    if _kind(t.dtype) != "int":
        raise TypeError(f"{fn}: {name} must be an integer tensor, got {t.dtype}")
    return has_data(fn, name, t) if data else t


def real(fn: str, name: str, value, *, integral: bool = False) -> torch.Tensor:
    """A Python number or a tensor of real values (integer or floating point; integer only
    with integral=True), as a tensor. bool and complex are refused: a flag or an imaginary
    part would be read as a number silently."""
    if isinstance(value, torch.Tensor):
        kind = _kind(value.dtype)
        if kind in ("bool", "complex") or (integral and kind != "int"):
            want = "an integer" if integral else "a real (integer or floating-point)"
            raise TypeError(f"{fn}: {name} must be {want} tensor, got {value.dtype}")
        return has_data(fn, name, value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (
            integral and not isinstance(value, numbers.Integral)):
        want = "an int" if integral else "a real number"
        raise TypeError(f"{fn}: {name} must be {want} or a tensor, got {value!r}")
    return torch.tensor(value)


def int_arg(fn: str, name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """A Python int (not bool, not a float with an integral value) in [lo, hi]."""
    if isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be an int, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{fn}: {name} must be an int, got {value!r}") from None
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{fn}: {name} must be in {_interval(lo, hi)}, got {v}")
    return v


def real_arg(fn: str, name: str, value, lo: float | None = None, hi: float | None = None,
             *, lo_open: bool = False) -> float:
    """A finite Python real number (not bool) in [lo, hi] ((lo, hi] with lo_open)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a real number, got {value!r}")
    v = float(value)
    low_ok = lo is None or (v > lo if lo_open else v >= lo)
    if not math.isfinite(v) or not low_ok or (hi is not None and v > hi):
        raise ValueError(f"{fn}: {name} must be a finite number in "
                         f"{_interval(lo, hi, lo_open)}, got {v!r}")
    return v


def bool_arg(fn: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be True or False, got {value!r}")
    return value


def quant_spec(fn: str, value, name: str = "spec"):
    from qcompile.numerics.specs import QuantSpec  # specs imports this module

    if not isinstance(value, QuantSpec):
        raise TypeError(f"{fn}: {name} must be a QuantSpec, got {type(value).__name__}")
    return value


def _interval(lo, hi, lo_open: bool = False) -> str:
    left = "(" if lo_open else "["
    return f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"


def reads_data(t: torch.Tensor) -> bool:
    """Whether a value check may read t: not under torch.compile, not a fake tensor."""
    if torch.compiler.is_compiling():
        return False
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(t)


def positive_finite(fn: str, name: str, t: torch.Tensor) -> None:
    """Every element finite and > 0 (scales): NaN, inf, 0 and negative scales quantize to
    wrong integers without any error."""
    if t.numel() == 0 or not reads_data(t):
        return
    bad = ~((t > 0) & (t < math.inf))  # NaN fails both comparisons
    if bool(bad.any()):
        value = float(t[bad].reshape(-1)[0])
        raise ValueError(f"{fn}: {name} must be finite and > 0, got {value!r}")


def within(fn: str, name: str, t: torch.Tensor, lo: int, hi: int, why: str = "") -> None:
    """Every element of an integer tensor in [lo, hi]."""
    if t.numel() == 0 or not reads_data(t):
        return
    low, high = torch.aminmax(t.reshape(-1).to(torch.int64))
    low, high = int(low), int(high)
    if low < lo or high > hi:
        got = low if low < lo else high
        raise ValueError(f"{fn}: {name} must lie in [{lo}, {hi}]{why}, got {got}")


def broadcasts_to(fn: str, name: str, t: torch.Tensor, shape: torch.Size | tuple,
                  target: str) -> None:
    """t broadcasts against `shape` without changing it (per-channel parameters of a
    tensor: never more dims, never a size the tensor does not have)."""
    try:
        ok = torch.broadcast_shapes(t.shape, shape) == tuple(shape)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{fn}: {name} of shape {tuple(t.shape)} does not broadcast against "
                         f"{target} of shape {tuple(shape)} (per channel: shape "
                         f"[{shape[-1] if len(shape) else 1}] for the last dim)")
