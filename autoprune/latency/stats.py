"""`LatencyStat` and the timing loop: warm-up, then repeats until the median is stable."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

# Passes over the policies that calibrate and validate a latency table. Each model is exported
# or compiled once and its passes cost only their timing (about 10 ms a pass for a ResNet-20
# here), so there can be many (see `autoprune.latency.profile.quickest_of_passes`). Validation
# takes more: it scores the ranking, and 50 MobileNetV2 policies measured while this machine
# swung 1.5x between passes agreed with themselves at Kendall tau 0.85 with 10 passes, 0.92
# with 20 (90 s in all).
PASSES, VALIDATE_PASSES = 10, 20


@dataclass(frozen=True)
class LatencyStat:
    """A latency distribution summary: never a single timing."""

    median_ms: float
    iqr_ms: float
    n: int

    def __post_init__(self):
        if not (self.median_ms >= 0 and self.iqr_ms >= 0 and self.n >= 1):
            raise ValueError(f"invalid LatencyStat {self}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_samples(cls, samples_ms: list[float]) -> LatencyStat:
        s = sorted(samples_ms)
        if len(s) < 4:
            return cls(statistics.median(s), (s[-1] - s[0]), len(s))
        q = statistics.quantiles(s, n=4, method="inclusive")
        return cls(statistics.median(s), q[2] - q[0], len(s))


def time_callable(fn: Callable[[], object], *, warmup: int = 5, min_repeats: int = 20,
                  max_repeats: int = 400, max_seconds: float = 3.0, rel_tol: float = 0.01,
                  inner: int | None = None) -> LatencyStat:
    """Time ``fn`` until the running median moves by less than ``rel_tol`` between checks.

    Very short calls are batched ``inner`` times per sample (chosen so a sample lasts >= 0.2 ms)
    so timer resolution and Python overhead stay well below the signal.
    """
    for _ in range(warmup):
        fn()
    if inner is None:
        t0 = time.perf_counter()
        fn()
        once = time.perf_counter() - t0
        inner = max(1, min(100, int(2e-4 / max(once, 1e-7))))
    samples: list[float] = []
    start = time.perf_counter()
    last_median = None
    while len(samples) < max_repeats:
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) * 1e3 / inner)
        if len(samples) >= min_repeats and len(samples) % 10 == 0:
            median = statistics.median(samples)
            stable = last_median is not None and abs(median - last_median) <= rel_tol * median
            if stable or time.perf_counter() - start > max_seconds:
                break
            last_median = median
    return LatencyStat.from_samples(samples)
