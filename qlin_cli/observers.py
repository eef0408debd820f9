"""Observers: they watch a stream of tensors (weights, or a layer's inputs during calibration)
and turn what they saw into a range, then into a scale and zero point.

Every observer keeps bounded state (a running min/max, or a fixed-size histogram per channel),
whatever the number of samples, and reduces with `primitives.amin_amax`, the same helper the
direct quantization uses.

Tensors are seen as `(rows, channels)` along `axis`: weights `(out, in)` have their channels on
axis 0 (one scale per output row), activations `(tokens, in)` on axis 1 (per input channel,
as SmoothQuant needs). Per tensor the range is a scalar.

| name             | range                                                           |
|------------------|-----------------------------------------------------------------|
| `minmax`         | running min and max (the default)                               |
| `absmax`         | running max of abs; always symmetric                            |
| `moving-average` | EMA of each batch's min and max (activations)                   |
| `percentile`     | the p-th and (100 - p)-th percentiles of everything seen        |
| `mse`            | the clipping range, shrunk from min/max, with the least int8 MSE |
"""

from __future__ import annotations

import torch

from .scheme import PER_TENSOR, Granularity
from .errors import ConfigError
from .primitives import MIN_SCALE, amin_amax, check_finite, qparams_from_range, qrange

__all__ = ["OBSERVERS", "Observer", "make_observer"]


class Observer:
    """Base: a running min/max. Subclasses change how a batch updates the range."""

    name = "minmax"

    def __init__(self, granularity: Granularity, axis: int = 0, what: str = "tensor") -> None:
        self.granularity, self.axis, self.what = granularity, axis, what
        self.fix = "check the calibration data" if "calibration" in what else "fix the model first"
        self.lo: torch.Tensor | None = None  # () per tensor, (C,) per channel
        self.hi: torch.Tensor | None = None

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_finite(x, self.what, self.fix)
        lo, hi = amin_amax(x, self.granularity, self.axis)
        return lo.cpu(), hi.cpu()  # observer state lives on the CPU, whatever the data's device

    def update(self, x: torch.Tensor) -> None:
        lo, hi = self._batch_range(x)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None:
            raise ConfigError(f"{self.what}: the observer saw no data (was the layer run during calibration?)")
        return self.lo, self.hi

    def qparams(self, symmetric: bool, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale (float32) and zero point (int8) of B-bit values, of shape `()` or `(C,)`."""
        lo, hi = self.range()
        return qparams_from_range(lo, hi, symmetric, bits)


class AbsMaxObserver(Observer):
    """Running max of |x|: the range [-amax, amax], for symmetric quantization."""

    name = "absmax"

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = super().range()
        amax = torch.maximum(-lo, hi)
        return -amax, amax

    def qparams(self, symmetric: bool, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.range()
        return qparams_from_range(lo, hi, True, bits)


class MovingAverageObserver(Observer):
    """Exponential moving average of each batch's min and max (factor `averaging`)."""

    name = "moving-average"

    def __init__(self, granularity: Granularity, axis: int = 0, what: str = "tensor", averaging: float = 0.01):
        super().__init__(granularity, axis, what)
        self.averaging = averaging

    def update(self, x: torch.Tensor) -> None:
        lo, hi = self._batch_range(x)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo = self.lo + self.averaging * (lo - self.lo)
            self.hi = self.hi + self.averaging * (hi - self.hi)


class HistogramObserver(Observer):
    """The distribution of everything seen, per channel (or per tensor), in bounded memory:
    `points` `(C, P)` ascending with their `counts`. While a channel has seen no more than `bins`
    values they are kept exactly (a weight row, say); past that, a fixed histogram of `bins`
    bins over the range seen so far, whose old counts move to the new bins when a batch widens
    the range.
    """

    bins = 2048

    def __init__(self, granularity: Granularity, axis: int = 0, what: str = "tensor") -> None:
        super().__init__(granularity, axis, what)
        self.points: torch.Tensor | None = None  # (C, P) float32, ascending
        self.counts: torch.Tensor | None = None  # (C, P) float64
        self.width: torch.Tensor | None = None  # (C, 1): 0 for exact values, else the bin width

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """x as (C, n) float32 on the CPU: one row per channel (one row per tensor)."""
        x = x.detach().float().cpu()
        if self.granularity == PER_TENSOR:
            return x.reshape(1, -1)
        return x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)

    def _bin(self, values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        width = (hi - lo).clamp_min(MIN_SCALE)[:, None]
        return ((values - lo[:, None]) / width * self.bins).long().clamp_(0, self.bins - 1)

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        rows = self._rows(x)
        if self.points is None and rows.shape[1] <= self.bins:
            self.points = rows.sort(dim=1).values
            self.counts = torch.ones_like(self.points, dtype=torch.float64)
            self.width = torch.zeros(rows.shape[0], 1)
            return
        lo, hi = self.lo.reshape(-1), self.hi.reshape(-1)
        hist = torch.zeros(lo.shape[0], self.bins, dtype=torch.float64)
        if self.points is not None:
            hist.scatter_add_(1, self._bin(self.points, lo, hi), self.counts)
        hist.scatter_add_(1, self._bin(rows, lo, hi), torch.ones_like(rows, dtype=torch.float64))
        self.width = ((hi - lo) / self.bins)[:, None]
        self.points = lo[:, None] + (torch.arange(self.bins) + 0.5) * self.width
        self.counts = hist

    def _shaped(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(self.lo.shape).float()


class PercentileObserver(HistogramObserver):
    """The `percentile`-th and (100 - percentile)-th percentiles of all values seen."""

    name = "percentile"

    def __init__(self, granularity: Granularity, axis: int = 0, what: str = "tensor", percentile: float = 99.99):
        super().__init__(granularity, axis, what)
        if not 50.0 < percentile <= 100.0:
            raise ConfigError(f"percentile {percentile} must be in (50, 100]")
        self.percentile = percentile

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        super().range()
        cdf = self.counts.cumsum(1)
        total = cdf[:, -1:]
        q = self.percentile / 100.0
        last = self.points.shape[1] - 1
        lo_idx = torch.searchsorted(cdf, total * (1.0 - q)).clamp_(max=last)
        hi_idx = torch.searchsorted(cdf, total * q).clamp_(max=last)
        half = self.width.squeeze(1) / 2  # a histogram bin's outer edge; 0 for exact values
        p_lo = torch.maximum(self.points.gather(1, lo_idx).squeeze(1) - half, self.lo.reshape(-1))
        p_hi = torch.minimum(self.points.gather(1, hi_idx).squeeze(1) + half, self.hi.reshape(-1))
        return self._shaped(p_lo), self._shaped(p_hi)


class MSEObserver(HistogramObserver):
    """The clipping range [a * min, a * max], a on a log grid over [0.001, 1], with the least
    expected quantization error (at the layer's bits) over the histogram of all values seen: each value clipped costs
    (value - edge)^2; each value inside costs its rounding error at the bin centre where bins
    are finer than the quantization step, and step^2 / 12 where they are coarser."""

    name = "mse"
    # shrink factors: a coarse grid down to 0.1% of the range, then a fine one around the best
    grid = torch.unique(torch.cat([torch.logspace(-3, 0, 25), torch.linspace(0.8, 1.0, 11)]))

    def qparams(self, symmetric: bool, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self._best_range(symmetric, bits)
        return qparams_from_range(lo, hi, symmetric, bits)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._best_range(symmetric=False)

    def _best_range(self, symmetric: bool, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        lo0, hi0 = super().range()
        lo0, hi0 = lo0.reshape(-1).clamp(max=0), hi0.reshape(-1).clamp(min=0)  # (C,)
        if symmetric:
            amax = torch.maximum(-lo0, hi0)
            lo0, hi0 = -amax, amax
        centres, counts, width = self.points, self.counts.float(), self.width  # (C, P), (C, P), (C, 1)
        qmin, qmax = qrange(bits, symmetric)
        levels = qmax - qmin

        def error(a: torch.Tensor) -> torch.Tensor:  # a: (C,) shrink factors -> (C,) error
            lo, hi = (lo0 * a)[:, None], (hi0 * a)[:, None]
            step = ((hi - lo) / levels).clamp_min(MIN_SCALE)
            zero = torch.zeros_like(step) if symmetric else torch.round(-lo / step)  # z - qmin
            rounded = (torch.round(centres / step + zero) - zero) * step
            noise = torch.where(width < step, (rounded - centres) ** 2, step**2 / 12)
            inside = (centres >= lo) & (centres <= hi)
            clipped = (lo - centres).clamp_min(0) ** 2 + (centres - hi).clamp_min(0) ** 2
            return ((clipped + inside * noise) * counts).sum(1)

        best_err = torch.full_like(lo0, float("inf"))
        best = torch.ones_like(lo0)
        coarse = [torch.full_like(lo0, a) for a in self.grid.tolist()]
        for stage in range(2):  # one (C, P) slice at a time: memory stays O(C * P)
            candidates = coarse if stage == 0 else [
                (best * f).clamp(max=1.0) for f in torch.linspace(0.85, 1.15, 31).tolist()
            ]
            for a in candidates:
                err = error(a)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = torch.where(better, a, best)
        return self._shaped(lo0 * best), self._shaped(hi0 * best)


OBSERVERS = {cls.name: cls for cls in (Observer, AbsMaxObserver, MovingAverageObserver, PercentileObserver, MSEObserver)}


def make_observer(name: str, granularity: Granularity, axis: int = 0, what: str = "tensor", **options) -> Observer:
    """An observer by name (see OBSERVERS); `options` are its parameters (e.g. percentile=99.9)."""
    try:
        cls = OBSERVERS[name]
    except KeyError:
        raise ConfigError(f"unknown observer {name!r}: use one of {', '.join(OBSERVERS)}") from None
    return cls(granularity, axis, what, **options)
