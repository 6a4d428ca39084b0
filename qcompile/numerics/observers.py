"""Calibration observers: they watch activations and turn what they saw into qparams.

Every observer has `update(x)` (x float32 or bf16, any leading dims; called once per
calibration batch), `stats` (a dict of what it accumulated, for reports) and `count`
(elements or rows seen). Range observers add `range(spec) -> (min, max)` and
`qparams(spec) -> (scale, zero_point)`, which always goes through specs.compute_qparams,
so observers decide a range and never their own rounding or integer range.

Memory is bounded whatever the amount of calibration data: running min/max, a
fixed-size histogram, a fixed-size uniform sample, or a K x K Hessian.
Names for `observer_for`: see OBSERVERS at the bottom.
"""

from __future__ import annotations

import math

import torch

from qcompile.numerics import _checks
from qcompile.numerics.specs import QuantSpec, compute_qparams


def _as_float(obs: Observer, x: torch.Tensor) -> torch.Tensor:
    """x as float32; refused: not a floating-point tensor, or a meta tensor (no values)."""
    return _checks.floating(f"{type(obs).__name__}.update", "x", x).detach().float()


class Observer:
    """Base: counts what it has seen. Subclasses implement `_update` and `stats`."""

    def __init__(self):
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x = _as_float(self, x)
        if x.numel() == 0:
            return
        self._update(x)
        self.count += x.numel()

    def _update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    @property
    def stats(self) -> dict:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(count={self.count})"


class RangeObserver(Observer):
    """An observer that ends in a quantization range for a per_tensor spec."""

    granularities: tuple[str, ...] = ("per_tensor",)

    def range(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def qparams(self, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        _checks.quant_spec(f"{type(self).__name__}.qparams", spec)
        if spec.granularity not in self.granularities:
            hint = (
                " (per_token parameters are dynamic: use dynamic_per_token_qparams)"
                if spec.granularity == "per_token"
                else ""
            )
            raise ValueError(
                f"{type(self).__name__} gives {'/'.join(self.granularities)} parameters, "
                f"not {spec.granularity}{hint}"
            )
        if self.count == 0:
            raise RuntimeError(f"{type(self).__name__} has seen no data: run calibration first")
        return compute_qparams(*self.range(spec), spec)


class MinMaxObserver(RangeObserver):
    """Running min and max over everything seen."""

    def __init__(self):
        super().__init__()
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def _update(self, x):
        self._merge(x.amin(), x.amax())

    def _merge(self, lo, hi):
        """Widen the running range by one batch's (lo, hi): scalars, or per channel."""
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        elif lo.shape != self.min_val.shape:
            raise ValueError(
                f"{type(self).__name__}: channel count changed from {self.min_val.numel()} "
                f"to {lo.numel()}"
            )
        else:
            self.min_val = torch.minimum(self.min_val, lo)
            self.max_val = torch.maximum(self.max_val, hi)

    def range(self, spec):
        return self.min_val, self.max_val

    @property
    def stats(self):
        return {"min": self.min_val, "max": self.max_val, "count": self.count}


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of each batch's min and max (the first batch sets them),
    so one outlier batch moves the range by only averaging_constant of its excess."""

    def __init__(self, averaging_constant: float = 0.01):
        super().__init__()
        self.averaging_constant = _checks.real_arg(
            type(self).__name__, "averaging_constant", averaging_constant, 0.0, 1.0, lo_open=True)

    def _update(self, x):
        lo, hi = x.amin(), x.amax()
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            c = self.averaging_constant
            self.min_val = self.min_val + c * (lo - self.min_val)
            self.max_val = self.max_val + c * (hi - self.max_val)


class PerChannelMinMaxObserver(MinMaxObserver):
    """Min and max per channel of `axis` (reducing over every other dim), for per_channel
    activation specs; the spec's axis must name the same dim of the quantized tensor."""

    granularities = ("per_channel",)

    def __init__(self, axis: int = -1):
        super().__init__()
        self.axis = _checks.int_arg(type(self).__name__, "axis", axis)

    def _channels(self, x: torch.Tensor) -> torch.Tensor:
        if not -x.dim() <= self.axis < x.dim():
            raise ValueError(f"{type(self).__name__}.update: axis {self.axis} is out of range "
                             f"for x of shape {tuple(x.shape)}")
        return x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)  # [C, rest]

    def _update(self, x):
        flat = self._channels(x)
        self._merge(flat.amin(dim=1), flat.amax(dim=1))


class PerChannelAbsMaxObserver(PerChannelMinMaxObserver):
    """max |x| per channel of `axis` (default: the last dim, the input features of a
    linear). This is the activation statistic SmoothQuant balances against the weights;
    as a range it is symmetric, [-absmax, absmax]."""

    def _update(self, x):
        super()._update(x.abs())

    @property
    def absmax(self) -> torch.Tensor | None:
        return self.max_val

    def range(self, spec):
        return -self.max_val, self.max_val

    @property
    def stats(self):
        return {"absmax": self.max_val, "count": self.count}


class PercentileObserver(RangeObserver):
    """Clips the range at a percentile of the data, from a fixed-size histogram.

    The histogram covers [-R, R] with `bins` equal bins, R a power of two. When data
    exceeds R, R grows by a power of two and existing bins merge exactly (old bin edges
    are new bin edges), so every value seen counts and memory stays `bins` counters.
    Symmetric specs clip |x| at the percentile; asymmetric ones clip min at
    (100 - percentile) and max at percentile. Within a bin the value is interpolated.
    """

    def __init__(self, percentile: float = 99.99, bins: int = 4096):
        super().__init__()
        name = type(self).__name__
        self.percentile = _checks.real_arg(name, "percentile", percentile, 0.0, 100.0,
                                           lo_open=True)
        self.bins = _checks.int_arg(name, "bins", bins, lo=2)
        if self.bins % 2:
            raise ValueError(f"{name}: bins must be even and >= 2, got {bins}")
        self.radius: float | None = None
        self.hist: torch.Tensor | None = None  # float64 counts, [bins]
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def _grow(self, radius: float) -> None:
        factor = radius / self.radius  # a power of two
        half = self.bins // 2
        # Old bin i covers [(i - half) w, (i - half + 1) w); with the new width factor * w it
        # falls wholly inside new bin floor((i - half) / factor) + half.
        old = torch.arange(self.bins, device=self.hist.device, dtype=torch.float64)
        idx = (torch.floor((old - half) / factor) + half).long()
        merged = torch.zeros_like(self.hist)
        merged.index_add_(0, idx, self.hist)
        self.hist, self.radius = merged, radius

    def _update(self, x):
        lo, hi = x.amin(), x.amax()
        absmax = max(-float(lo), float(hi))
        if not math.isfinite(absmax):
            raise ValueError(f"{type(self).__name__} saw inf or NaN")
        # The smallest power of two strictly above absmax (1.0 for all-zero data).
        radius = 2.0 ** math.frexp(absmax)[1] if absmax > 0 else 1.0
        if self.hist is None:
            self.hist = torch.zeros(self.bins, dtype=torch.float64, device=x.device)
            self.radius = radius
            self.min_val, self.max_val = lo, hi
        else:
            if radius > self.radius:
                self._grow(radius)
            self.min_val = torch.minimum(self.min_val, lo)
            self.max_val = torch.maximum(self.max_val, hi)
        width = 2.0 * self.radius / self.bins
        idx = torch.floor((x.reshape(-1) + self.radius) / width).long().clamp(0, self.bins - 1)
        self.hist += torch.bincount(idx, minlength=self.bins).to(torch.float64)

    @staticmethod
    def _quantile(hist: torch.Tensor, left: float, width: float, fraction: float) -> float:
        """Value below which `fraction` of the histogram's mass lies, linear within a bin."""
        cdf = torch.cumsum(hist, 0)
        target = fraction * float(cdf[-1])
        i = int(torch.searchsorted(cdf, torch.tensor([target], dtype=cdf.dtype, device=cdf.device)))
        i = min(i, hist.numel() - 1)
        before = float(cdf[i - 1]) if i > 0 else 0.0
        inside = float(hist[i])
        frac = (target - before) / inside if inside > 0 else 1.0
        return left + (i + min(max(frac, 0.0), 1.0)) * width

    def range(self, spec):
        width = 2.0 * self.radius / self.bins
        p = self.percentile / 100.0
        if spec.symmetric:
            half = self.bins // 2
            # Fold [-R, R] onto |x| in [0, R]: bin half + j and bin half - 1 - j hold |x| in
            # [j w, (j + 1) w).
            folded = self.hist[half:] + self.hist[:half].flip(0)
            a = self._quantile(folded, 0.0, width, p)
            absmax = max(-float(self.min_val), float(self.max_val))
            a = torch.tensor(min(a, absmax), dtype=torch.float32, device=self.min_val.device)
            return -a, a
        lo = self._quantile(self.hist, -self.radius, width, 1.0 - p)
        hi = self._quantile(self.hist, -self.radius, width, p)
        lo = torch.tensor(
            max(lo, float(self.min_val)), dtype=torch.float32, device=self.min_val.device
        )
        hi = torch.tensor(
            min(hi, float(self.max_val)), dtype=torch.float32, device=self.min_val.device
        )
        return lo, hi

    @property
    def stats(self):
        return {
            "min": self.min_val,
            "max": self.max_val,
            "percentile": self.percentile,
            "radius": self.radius,
            "count": self.count,
        }


class _UniformSample:
    """A uniform sample without replacement of at most `size` values from a stream.

    Every value gets an independent uniform random key; the sample is the `size` values
    with the smallest keys so far (bottom-k), which is a uniform sample of everything
    seen. Seeded generator: the same data in the same order gives the same sample.
    """

    def __init__(self, size: int, seed: int):
        self.size = size
        self.seed = seed
        self.generator: torch.Generator | None = None
        self.values: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1)
        if self.generator is None:
            self.generator = torch.Generator(device=flat.device).manual_seed(self.seed)
        keys = torch.rand(flat.numel(), generator=self.generator, device=flat.device)
        if self.values is not None:
            flat = torch.cat((self.values, flat))
            keys = torch.cat((self.keys, keys))
        if flat.numel() > self.size:
            keys, idx = torch.topk(keys, self.size, largest=False, sorted=False)
            flat = flat[idx]
        self.values, self.keys = flat, keys


class MSEObserver(RangeObserver):
    """Chooses the clipping range that minimises quantization MSE on the data seen.

    Candidate ranges are ratio * (min, max) for `grid` ratios in [min_ratio, 1]; each is
    scored by the MSE of fake-quantizing a bounded uniform sample (`sample_size` values)
    with exactly the qparams it would produce. Exact min and max are tracked separately,
    so ratio 1 is the min-max range.
    """

    def __init__(
        self,
        grid: int = 100,
        min_ratio: float = 0.2,
        sample_size: int = 1 << 15,
        seed: int = 0,
    ):
        super().__init__()
        name = type(self).__name__
        self.grid = _checks.int_arg(name, "grid", grid, lo=1)
        self.min_ratio = _checks.real_arg(name, "min_ratio", min_ratio, 0.0, 1.0, lo_open=True)
        self.sample = _UniformSample(_checks.int_arg(name, "sample_size", sample_size, lo=1),
                                     _checks.int_arg(name, "seed", seed))
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None
        self.best_ratio: float | None = None

    def _update(self, x):
        lo, hi = x.amin(), x.amax()
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = torch.minimum(self.min_val, lo)
            self.max_val = torch.maximum(self.max_val, hi)
        self.sample.add(x)

    # candidates scored per chunk: [chunk, sample_size] float32 temporaries (4 MiB each)
    _CHUNK = 32

    def range(self, spec):
        data = self.sample.values.detach().float()
        ratios = torch.linspace(self.min_ratio, 1.0, self.grid, dtype=torch.float64)
        # float32 ratios: what min_val * ratio computed when each candidate was scored alone
        r32 = ratios.to(device=data.device, dtype=torch.float32)
        los, his = self.min_val * r32, self.max_val * r32
        scale, zp = compute_qparams(los, his, spec)  # elementwise: each candidate's own
        errs = []
        for i in range(0, len(r32), self._CHUNK):
            s, z = scale[i:i + self._CHUNK, None], zp[i:i + self._CHUNK, None].float()
            e = torch.div(data, s).round_().add_(z).clamp_(spec.qmin, spec.qmax)
            e = e.sub_(z).mul_(s).sub_(data)  # fake-quantized minus data, in place
            errs.append(e.square_().sum(dim=1, dtype=torch.float64))
        # argmin keeps the smallest ratio on exact ties: deterministic
        best = int(torch.argmin(torch.cat(errs)))
        self.best_ratio = float(ratios[best])
        return los[best], his[best]

    @property
    def stats(self):
        return {
            "min": self.min_val,
            "max": self.max_val,
            "best_ratio": self.best_ratio,
            "count": self.count,
        }


class HessianObserver(Observer):
    """H = 2/n * sum over rows of x^T x for a linear input x [..., K], in float64 (GPTQ).

    Keeps the float64 sum and the row count n; `hessian` divides on demand, so the result
    does not depend on how the rows were split into batches (up to float64 rounding).
    `count` here is rows, not elements. Also the sum of |x|^4 over rows, from which
    `shrinkage` says how far to trust H as an estimate of the input's true second moment
    (hessian_shrinkage).
    """

    def __init__(self):
        super().__init__()
        self.xtx: torch.Tensor | None = None
        self.norm4 = 0.0  # sum over rows of |x|^4, float64

    def update(self, x: torch.Tensor) -> None:
        x = _as_float(self, x)
        if x.numel() == 0:
            return
        if x.dim() == 0:
            raise ValueError("HessianObserver.update: x must be [..., K] (a linear's input), "
                             "got a 0-d tensor")
        rows = x.reshape(-1, x.shape[-1]).double()  # [n, K]
        if self.xtx is None:
            self.xtx = torch.zeros(
                rows.shape[1], rows.shape[1], dtype=torch.float64, device=rows.device
            )
        elif self.xtx.shape[0] != rows.shape[1]:
            raise ValueError(
                f"HessianObserver: input features changed from {self.xtx.shape[0]} "
                f"to {rows.shape[1]}"
            )
        self.xtx += rows.T @ rows
        self.norm4 += row_norm4(rows)
        self.count += rows.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        if self.count == 0:
            raise RuntimeError("HessianObserver has seen no data: run calibration first")
        return self.xtx * (2.0 / self.count)

    @property
    def shrinkage(self) -> float:
        """hessian_shrinkage of what was seen: 0 trusts H as it is, 1 keeps only its mean
        diagonal."""
        return hessian_shrinkage(self.hessian, self.count, self.norm4)

    @property
    def stats(self):
        return {"rows": self.count, "features": None if self.xtx is None else self.xtx.shape[0]}


def hessian_shrinkage(h: torch.Tensor, n: int, norm4: float) -> float:
    """Ledoit and Wolf's (2004) shrinkage intensity rho in [0, 1] for H = 2/n sum x x^T over
    n rows x [K] with sum |x|^4 = norm4: (1 - rho) H + rho mean(diag H) I is, of that
    family, the estimate of the inputs' true second moment with the least expected squared
    error. rho is the sampling variance of H's entries over their spread around the mean
    diagonal: near 1 from a few rows (H's rank is at most n), near 0 from many rows of
    inputs far from isotropic. GPTQ on an unshrunk H from fewer rows than K fits the
    weight to the calibration rows' subspace and nothing else.
        rho = min(1, (norm4 / n^2 - |S|^2 / n) / |S - mu I|^2),  S = H / 2, mu = tr(S) / K
    """
    s = h.double() / 2.0
    k = s.shape[0]
    trace, frob2 = float(s.diagonal().sum()), float(s.pow(2).sum())
    mu = trace / k
    spread = frob2 - 2 * mu * trace + k * mu * mu  # |S - mu I|^2
    if n <= 0 or spread <= 0:  # nothing seen, or already isotropic: nothing to shrink
        return 0.0
    variance = norm4 / (n * n) - frob2 / n
    return min(1.0, max(0.0, variance / spread))


def row_norm4(rows: torch.Tensor) -> float:
    """sum over the rows [n, K] of |x|^4 (hessian_shrinkage's norm4)."""
    return float(rows.pow(2).sum(1).pow(2).sum())


def shrink_hessian(h: torch.Tensor, rho: float) -> torch.Tensor:
    """(1 - rho) H + rho mean(diag H) I (hessian_shrinkage), in H's dtype; any square
    second-moment matrix (sequential GPTQ shrinks X_q^T X_f the same way)."""
    if rho <= 0:
        return h
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return (1 - rho) * h + rho * h.diagonal().mean() * eye


class MeanObserver(Observer):
    """The mean of x per channel of `axis` (default: the last dim, a linear's input
    features) over every other dim, summed in float64: E[x_j], from which bias correction
    computes a layer's mean output shift. `count` here is rows (values per channel)."""

    def __init__(self, axis: int = -1):
        super().__init__()
        self.axis = _checks.int_arg(type(self).__name__, "axis", axis)
        self.total: torch.Tensor | None = None  # float64 [C]

    def update(self, x: torch.Tensor) -> None:
        x = _as_float(self, x)
        if x.numel() == 0:
            return
        if not -x.dim() <= self.axis < x.dim():
            raise ValueError(f"{type(self).__name__}.update: axis {self.axis} is out of range "
                             f"for x of shape {tuple(x.shape)}")
        rows = x.movedim(self.axis, -1).reshape(-1, x.shape[self.axis])  # [n, C]
        total = rows.sum(dim=0, dtype=torch.float64)
        if self.total is None:
            self.total = total
        elif self.total.shape != total.shape:
            raise ValueError(f"{type(self).__name__}: channel count changed from "
                             f"{self.total.numel()} to {total.numel()}")
        else:
            self.total += total
        self.count += rows.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        if self.count == 0:
            raise RuntimeError("MeanObserver has seen no data: run calibration first")
        return self.total / self.count

    @property
    def stats(self):
        return {"mean": None if self.count == 0 else self.mean, "rows": self.count}


class RowSampleObserver(Observer):
    """A uniform sample without replacement of at most `rows` rows of x [..., K] (each row
    gets a uniform random key; the sample is the rows with the smallest keys so far, as in
    _UniformSample), for statistics that need quantization parameters known only once
    calibration ends (bias correction's activation part). Seeded: the same data in the same
    order gives the same sample. Memory: rows x K float32. `count` here is rows seen."""

    def __init__(self, rows: int = 512, seed: int = 0):
        super().__init__()
        name = type(self).__name__
        self.size = _checks.int_arg(name, "rows", rows, lo=1)
        self.seed = _checks.int_arg(name, "seed", seed)
        self.generator: torch.Generator | None = None
        self.rows: torch.Tensor | None = None  # float32 [<= size, K]
        self.keys: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = _as_float(self, x)
        if x.numel() == 0:
            return
        if x.dim() == 0:
            raise ValueError(f"{type(self).__name__}.update: x must be [..., K], got a 0-d "
                             "tensor")
        rows = x.reshape(-1, x.shape[-1])  # [n, K]
        n = rows.shape[0]
        if self.generator is None:
            self.generator = torch.Generator(device=rows.device).manual_seed(self.seed)
        keys = torch.rand(n, generator=self.generator, device=rows.device)
        if self.rows is not None:
            if self.rows.shape[1] != rows.shape[1]:
                raise ValueError(f"{type(self).__name__}: input features changed from "
                                 f"{self.rows.shape[1]} to {rows.shape[1]}")
            rows, keys = torch.cat((self.rows, rows)), torch.cat((self.keys, keys))
        if rows.shape[0] > self.size:
            keys, idx = torch.topk(keys, self.size, largest=False, sorted=False)
            rows = rows[idx]
        self.rows = rows.clone() if rows.data_ptr() == x.data_ptr() else rows
        self.keys = keys
        self.count += n

    @property
    def stats(self):
        return {"rows": self.count, "kept": 0 if self.rows is None else self.rows.shape[0]}


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average_minmax": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "per_channel_minmax": PerChannelMinMaxObserver,
    "per_channel_absmax": PerChannelAbsMaxObserver,
    "hessian": HessianObserver,
    "per_channel_mean": MeanObserver,
    "row_sample": RowSampleObserver,
}


def observer_for(name: str, **kwargs) -> Observer:
    """A new observer by name, with its constructor's keyword arguments."""
    try:
        cls = OBSERVERS[name]
    except KeyError:
        raise ValueError(
            f"unknown observer {name!r}; known observers: {', '.join(sorted(OBSERVERS))}"
        ) from None
    return cls(**kwargs)
