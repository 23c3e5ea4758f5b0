"""`LatencyPredictor`: policy -> predicted ms on the device, from a latency table.

Each conv/linear op's cost is looked up in the table, or interpolated (bilinear in input and
output channels; linear for depthwise) between the grid points of its family. Costs are made
non-decreasing across the device's channel multiples (a cumulative max along each axis), so
measurement noise never makes a wider layer look cheaper; non-multiples keep their raw value,
since runtimes really do run them on slower kernels. The sum of op costs is calibrated to
whole-model latency with the table's fitted scale (per op kind where fitted so) and offset for
this model.

For speed (>= 10,000 predictions/s) every op's cost over its groups' channel grid is computed
once; a prediction is then one array lookup per op.
"""

from __future__ import annotations

import bisect
import logging
from collections import defaultdict

import numpy as np

from ..errors import UserError
from ..policy import Policy
from ..space import SearchSpace
from .ops import LayerOp, OpSig
from .table import Calibration, LatencyTable, profile_command

log = logging.getLogger(__name__)


class MissingEntry(UserError):
    """The table lacks an op (and the grid points to interpolate it from)."""


class _Family:
    """The measured grid of one op family: cin x cout -> ms. A depthwise family is 1-D (its
    input and output widths are one number)."""

    def __init__(self, points: dict[tuple[int, int], float], multiple: int, *, diagonal: bool):
        self.diagonal = diagonal
        if diagonal:
            self.cs = sorted(ci for ci, _ in points)
            vals = np.array([points[(c, c)] for c in self.cs])[None, :]
            self.grid = _monotone(vals, [multiple], self.cs, multiple)[0]
            return
        self.cins = sorted({ci for ci, _ in points})
        self.couts = sorted({co for _, co in points})
        grid = np.full((len(self.cins), len(self.couts)), np.nan)
        for (ci, co), ms in points.items():
            grid[self.cins.index(ci), self.couts.index(co)] = ms
        self.grid = _monotone(grid, self.cins, self.couts, multiple)

    def value(self, cin: int, cout: int) -> float:
        if self.diagonal:
            i0, i1, t = _bracket(self.cs, cout)
            return float("nan") if i0 is None else \
                float(self.grid[i0] * (1 - t) + self.grid[i1] * t)
        i0, i1, ti = _bracket(self.cins, cin)
        j0, j1, tj = _bracket(self.couts, cout)
        if i0 is None or j0 is None:
            return float("nan")
        g = self.grid
        # NaN (a grid point never measured) propagates: the caller reports a missing entry.
        return float(g[i0, j0] * (1 - ti) * (1 - tj) + g[i1, j0] * ti * (1 - tj)
                     + g[i0, j1] * (1 - ti) * tj + g[i1, j1] * ti * tj)


def _bracket(xs: list[int], x: int):
    """Indices (lo, hi) around x in sorted xs and the fraction between them; None outside."""
    if x < xs[0] or x > xs[-1]:
        return None, None, 0.0
    k = bisect.bisect_left(xs, x)
    if xs[k] == x:
        return k, k, 0.0
    lo, hi = k - 1, k
    return lo, hi, (x - xs[lo]) / (xs[hi] - xs[lo])


def _monotone(grid: np.ndarray, cins: list[int], couts: list[int], multiple: int) -> np.ndarray:
    out = grid.copy()
    rows = [i for i, c in enumerate(cins) if c % multiple == 0]
    cols = [j for j, c in enumerate(couts) if c % multiple == 0]
    if not rows:  # a fixed input width (e.g. the stem's 1 or 3 channels) is one row
        rows = list(range(len(cins)))
    if not cols:  # likewise a fixed output width (the classifier's classes)
        cols = list(range(len(couts)))
    if np.isnan(out[np.ix_(rows, cols)]).any():
        return out  # an incomplete grid: leave it raw rather than fill holes
    for _ in range(2):  # two sweeps settle both axes
        for i in rows:
            out[i, cols] = np.maximum.accumulate(out[i, cols])
        for j in cols:
            out[rows, j] = np.maximum.accumulate(out[rows, j])
    return out


class LatencyPredictor:
    """Predicts whole-model latency (ms) of a policy of ``space`` on the table's device."""

    def __init__(self, table: LatencyTable, space: SearchSpace, ops: list[LayerOp], *,
                 model_key: str, channel_multiple: int = 1, calibrated: bool = True):
        self.table, self.space, self.ops = table, space, ops
        self.model_key = model_key
        self.calibration: Calibration | None = \
            table.calibration.get(model_key) if calibrated else None
        if self.calibration is None and calibrated:
            log.warning("latency table %s has no calibration for %s: predictions are raw sums "
                        "of op latencies", table.path, model_key)
        self._families = self._build_families(table, channel_multiple)
        self._raw_cache: dict[str, float] = {}
        # per op: (in group, out group, in choices, out choices, cost matrix)
        self._compiled = [self._compile(op) for op in ops]
        self._full_dict = space.full().to_dict()
        cal = self.calibration
        self._weights = [cal.scale_for(op.kind) if cal else 1.0 for op in ops]
        self._offset = cal.offset_ms if cal else 0.0

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _build_families(table: LatencyTable, multiple: int):
        points: dict[tuple, dict[tuple[int, int], float]] = defaultdict(dict)
        for key, stat in table.entries.items():
            sig = OpSig.from_key(key)
            points[sig.family][(sig.cin, sig.cout)] = stat.median_ms
        return {fam: _Family(pts, multiple, diagonal=fam[0] == "depthwise")
                for fam, pts in points.items()}

    def op_cost(self, sig: OpSig) -> float:
        """ms of one op (uncalibrated): the table's (monotone) value or an interpolation."""
        cached = self._raw_cache.get(sig.key)
        if cached is not None:
            return cached
        fam = self._families.get(sig.family)
        value = fam.value(sig.cin, sig.cout) if fam is not None else float("nan")
        if not np.isfinite(value):
            command = profile_command(self.table.device, self.model_key.split("@")[0],
                                      self.table.path)
            raise MissingEntry(
                f"latency table {str(self.table.path)!r} has no entry for op {sig.key} (nor "
                f"grid points around it); run `{command}`")
        self._raw_cache[sig.key] = value
        return value

    def _choices(self, group: str | None, full: int) -> list[int]:
        return list(self.space.group(group).choices) if group else [full]

    def _compile(self, op: LayerOp):
        cins = self._choices(op.in_group if op.kind != "depthwise" else None, op.cin)
        couts = self._choices(op.out_group, op.cout)
        costs = np.empty((len(cins), len(couts)))
        for i, ci in enumerate(cins):
            for j, co in enumerate(couts):
                d = {k: v for k, v in ((op.in_group, ci), (op.out_group, co)) if k}
                costs[i, j] = self.op_cost(op.sig(d))
        in_group = op.in_group if op.kind != "depthwise" else None
        return (in_group, op.out_group, {c: i for i, c in enumerate(cins)},
                {c: j for j, c in enumerate(couts)}, costs, op)

    # ------------------------------------------------------------------ predict
    def ops_ms(self, policy: Policy | dict[str, int]) -> list[float]:
        """Per-op uncalibrated ms, in model order."""
        get = policy.get
        out = []
        for in_group, out_group, ci_idx, co_idx, costs, op in self._compiled:
            i = ci_idx.get(get(in_group)) if in_group else 0
            j = co_idx.get(get(out_group)) if out_group else 0
            if i is None or j is None:  # off the grid: interpolate
                d = {k: get(k) for k in (in_group, out_group) if k}
                out.append(self.op_cost(op.sig(d)))
            else:
                out.append(costs[i, j])
        return out

    def predict(self, policy: Policy | dict[str, int]) -> float:
        """Predicted whole-model latency in ms. Groups the policy does not name are full."""
        if isinstance(policy, Policy):
            policy = policy.to_dict()
        full = self._full_dict
        merged = policy if len(policy) == len(full) else {**full, **policy}
        return float(sum(w * ms for w, ms in zip(self._weights, self.ops_ms(merged),
                                                 strict=True))) + self._offset

    def sweep(self, policy: Policy | dict[str, int], group: str) -> dict[int, float]:
        """``predict({**policy, group: c})`` for every grid point ``c`` of ``group``, in one
        pass over the ops (amc's env asks this at every step: a dozen predictions a step were
        a third of its rollout time). Equal to those predictions up to float rounding."""
        if isinstance(policy, Policy):
            policy = policy.to_dict()
        choices = self.space.group(group).choices
        get = {**self._full_dict, **policy}.get
        fixed, varying = 0.0, np.zeros(len(choices))
        for w, (in_group, out_group, ci_idx, co_idx, costs, _op) in zip(
                self._weights, self._compiled, strict=True):
            reads, writes = in_group == group, out_group == group
            i = None if reads else ci_idx.get(get(in_group)) if in_group else 0
            j = None if writes else co_idx.get(get(out_group)) if out_group else 0
            if (i is None and not reads) or (j is None and not writes):  # off the grid
                return {c: self.predict({**policy, group: c}) for c in choices}
            if reads and writes:
                varying += w * np.diagonal(costs)
            elif writes:
                varying += w * costs[i, :]
            elif reads:
                varying += w * costs[:, j]
            else:
                fixed += w * costs[i, j]
        return {c: float(v) + fixed + self._offset for c, v in zip(choices, varying, strict=True)}

    def group_costs(self, policy: Policy | dict[str, int]) -> dict[str, float]:
        """Calibrated ms attributed to each group (an op counts for the group pruning its
        outputs; ops with fixed outputs go under ``"<fixed>"``, with the calibration offset)."""
        if isinstance(policy, Policy):
            policy = policy.to_dict()
        merged = {**self._full_dict, **policy}
        out: dict[str, float] = defaultdict(float)
        for w, ms, (_, out_group, *_rest) in zip(self._weights, self.ops_ms(merged),
                                                 self._compiled, strict=True):
            out[out_group or "<fixed>"] += w * ms
        out["<fixed>"] += self._offset
        return dict(out)

    def cheapest_completion(self, partial: dict[str, int]) -> float:
        """The lowest latency any policy extending ``partial`` can reach: the unnamed groups at
        their minimum widths (costs are non-decreasing in channels). AMC's action wall uses it
        to keep an episode feasible while it is built."""
        smallest = self.space.smallest().to_dict()
        return self.predict({**smallest, **partial})

    def min_latency(self) -> float:
        return self.predict(self.space.smallest())

    def max_latency(self) -> float:
        return self.predict(self.space.full())
