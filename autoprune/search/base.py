"""The `Searcher` interface and AMC's action wall, shared by every searcher."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..evaluate import Candidate
from ..policy import Policy
from ..space import SearchSpace


@dataclass
class SearchContext:
    """What a study hands a searcher.

    ``evaluate(policy, trial)`` returns the candidate (from the study's cache when the policy
    was evaluated before, e.g. before a crash) and logs new ones durably; ``n_trials`` is the
    total for the study, ``done_trials`` the trials already logged for this searcher (trial
    number -> its policy).
    """

    evaluate: Callable[[Policy, int], Candidate]
    n_trials: int
    seed: int
    state_dir: Path
    storage_url: str | None = None
    study_name: str = "autoprune"
    done_trials: dict[int, Policy] = field(default_factory=dict)
    shared_storage: bool = False  # --storage URL: other workers may write the same study
    on_candidate: Callable[[Candidate], None] = lambda c: None
    # whether a policy was evaluated already (in the study's cache): a searcher moves a
    # proposal that repeats one to a policy not yet evaluated (`BudgetWall.unseen_near`)
    known: Callable[[Policy], bool] = lambda p: False
    # the keys of the study's config that define it (`study.identity`): a shared Optuna study
    # keeps its maker's, which a worker joining it must match (`check_shared_config`)
    identity: dict | None = None


class BudgetWall:
    """AMC's action wall: a policy is built group by group, and each group may keep at most
    the channels that still let the remaining groups, at their minimum, meet the budget.
    Costs are non-decreasing across the device's channel multiples, but a width between two
    multiples may cost more than the next one up (runtimes pad it, or run it on a slower
    kernel, and a table measured on a finer grid says so), so a width below the wall is
    checked too (`clip`): every policy built this way is feasible."""

    def __init__(self, space: SearchSpace, predictor, budget_ms: float):
        self.space, self.predictor, self.budget_ms = space, predictor, budget_ms
        self._smallest = space.smallest().to_dict()
        self._tol = budget_ms * 1e-9

    def allows(self, ms: float) -> bool:
        """Whether a predicted latency is within the budget (to float rounding)."""
        return ms <= self.budget_ms + self._tol

    def fits(self, partial: dict[str, int]) -> bool:
        return self.allows(self.predictor.predict({**self._smallest, **partial}))

    def max_keep(self, partial: dict[str, int], group: str) -> int:
        """The widest grid point of ``group`` that keeps ``partial`` completable."""
        choices = self.space.group(group).choices
        lo, hi = 0, len(choices) - 1
        if self.fits({**partial, group: choices[hi]}):
            return choices[hi]
        while lo < hi:  # cost is monotone in the choice: bisect for the last feasible one
            mid = (lo + hi + 1) // 2
            if self.fits({**partial, group: choices[mid]}):
                lo = mid
            else:
                hi = mid - 1
        return choices[lo]

    def clip(self, partial: dict[str, int], group: str, keep: int,
             costs: dict[int, float] | None = None) -> int:
        """``keep``, or where it does not fit (a width dearer than a wider one) the widest
        narrower grid point that does; the minimum always fits a completable ``partial``.
        ``costs`` (width -> predicted ms of ``partial`` with it and the later groups at their
        minimum), where the caller has them, saves predicting them again."""
        def fits(c: int) -> bool:
            return self.allows(costs[c]) if costs is not None else \
                self.fits({**partial, group: c})

        if fits(keep):
            return keep
        narrower = [c for c in self.space.group(group).choices if c < keep]
        for c in reversed(narrower[1:]):
            if fits(c):
                return c
        return narrower[0] if narrower else keep

    def project(self, proposed: dict[str, int], *, hold: str | None = None) -> Policy:
        """A feasible policy that keeps the *shape* of a proposal: every group is moved toward
        its minimum by one common factor, the smallest move that fits; the slack that
        snapping to the grid leaves is then handed back, group by group, up to the proposal.
        A group named by ``hold`` keeps its proposed width while the others shrink (or, where
        it does not fit even with them at their minimum, the widest that does).

        Clipping in group order (``max_keep``, AMC's per-step wall) puts every later group on its
        minimum whenever early groups overspend, whatever was proposed for it: at tight
        budgets many proposals collapse onto the same few policies, and a searcher cannot
        learn the later groups.
        A feasible proposal is returned unchanged."""
        groups = self.space.groups
        want = {g.name: g.snap_down(proposed.get(g.name, g.channels)) for g in groups}
        if self.predictor.predict(want) <= self.budget_ms + self._tol:
            return Policy.from_dict(want)
        if hold is not None:
            want[hold] = min(want[hold], self.max_keep({}, hold))

        def shrunk(t: float) -> dict[str, int]:
            return {g.name: want[g.name] if g.name == hold else
                    g.snap_down(g.min_channels + t * (want[g.name] - g.min_channels))
                    for g in groups}

        lo, hi = 0.0, 1.0  # shrunk(0) is the smallest policy, feasible (the budget was checked)
        for _ in range(30):
            mid = (lo + hi) / 2
            if self.predictor.predict(shrunk(mid)) <= self.budget_ms + self._tol:
                lo = mid
            else:
                hi = mid
        out = shrunk(lo)
        for g in groups:  # hand back the snapping slack (costs are monotone: stays feasible)
            options = [c for c in g.choices if out[g.name] < c <= want[g.name]]
            for c in reversed(options):
                if self.predictor.predict({**out, g.name: c}) <= self.budget_ms + self._tol:
                    out[g.name] = c
                    break
        return Policy.from_dict(out)

    def unseen_near(self, policy: Policy, known: Callable[[Policy], bool], rng, *,
                    hops: int = 4, draws: int = 32) -> Policy:
        """A feasible policy near ``policy`` that ``known`` says was not evaluated yet; where
        none is within ``hops`` steps, one of ``draws`` random proposals projected onto the
        budget (as `random` draws them); ``policy`` itself when none of those is new either.

        At a tight budget few policies fit (ResNet-20 at 0.3 on a 4-channel grid: about 12,900
        of 1.8e10), projection sends many proposals onto the same ones, and a repeat is served
        from the cache: 300 NSGA-II trials evaluated only 126 to 145 policies, and random 229 to
        239, so a searcher was compared with others at fewer evaluated candidates than asked.
        One step moves one group one grid point: wider first (trading a grid point of another
        group where the budget needs it), so the neighbour stays near the budget, where the
        accurate policies are; then narrower. When every neighbour was evaluated, the walk
        goes on from a random one.

        Around a converged population every neighbour a few steps out can be evaluated: with
        the walk alone, 300 NSGA-II trials at 0.3 still evaluated only 217 to 288 policies, and
        amc ran up to 404 episodes for its 300. A random projected draw lands elsewhere on the
        budget wall, where most feasible policies are new."""
        cur = policy.to_dict()
        for _ in range(hops):
            moves = self._moves(cur, rng)
            for m in moves:
                p = Policy.from_dict(m)
                if not known(p):
                    return p
            if not moves:
                break
            cur = moves[int(rng.integers(len(moves)))]
        for _ in range(draws):
            p = self.draw(rng)
            if not known(p):
                return p
        return policy

    def draw(self, rng) -> Policy:
        """A random feasible policy: each group draws a keep ratio uniformly, and the draw is
        projected onto the budget (`project`)."""
        return self.project({g.name: g.keep_for_ratio(float(rng.uniform(0.0, 1.0)))
                             for g in self.space.groups})

    def _moves(self, cur: dict[str, int], rng) -> list[dict[str, int]]:
        """Feasible policies one grid step from ``cur`` (see `unseen_near`), in random order
        within each kind: one group wider (with another one narrower where needed), then one
        group narrower."""
        groups = self.space.groups
        order = [groups[i] for i in rng.permutation(len(groups))]
        wider, narrower = [], []
        for g in order:
            k = g.choices.index(cur[g.name])
            if k + 1 < len(g.choices):
                up = {**cur, g.name: g.choices[k + 1]}
                if self.fits(up):
                    wider.append(up)
                else:
                    for h in order:
                        kh = h.choices.index(cur[h.name])
                        if h is g or kh == 0:
                            continue
                        trade = {**up, h.name: h.choices[kh - 1]}
                        if self.fits(trade):
                            wider.append(trade)
                            break
            if k > 0 and self.fits(down := {**cur, g.name: g.choices[k - 1]}):
                narrower.append(down)
        return wider + narrower


class Searcher(abc.ABC):
    """A search strategy over a `SearchSpace` under a latency budget.

    Call order: ``Searcher(space, predictor, budget_ms, seed=..., **options)``, then
    ``run(ctx)`` once per process. ``run`` must be resumable: called on a study that already
    holds some of its trials (``ctx.done_trials``), it continues up to ``ctx.n_trials`` in
    total, asking ``ctx.evaluate`` again for logged policies (served from the cache, never
    re-evaluated) only where it needs their results.
    """

    name = "base"

    def __init__(self, space: SearchSpace, predictor, budget_ms: float, *, seed: int = 0):
        self.space, self.predictor, self.budget_ms, self.seed = space, predictor, budget_ms, \
            seed
        self.wall = BudgetWall(space, predictor, budget_ms)

    @abc.abstractmethod
    def run(self, ctx: SearchContext) -> None:
        """Propose and evaluate policies until the study holds ``ctx.n_trials``."""

    def options(self) -> dict:
        """Settings that belong in the study's frozen config."""
        return {}

    def seeds(self) -> list[Policy]:
        """`seed_policies` at this searcher's budget: evolution's first generation, amc's
        first episodes."""
        from .baselines import best_uniform  # (baselines imports this module)

        return seed_policies(self.space, self.wall,
                             best_uniform(self.space, self.predictor, self.budget_ms))


def seed_policies(space, wall, uniform: Policy) -> list[Policy]:
    """Seeds for a search (evolution's first generation, amc's first episodes): the uniform
    policy at the budget, then for each group that
    policy with that group kept whole and the others shrunk by one common factor to pay for
    it (`BudgetWall.project` with ``hold``; where the group does not fit whole even with the
    others at their minimum, the widest that does). Repeats are dropped.

    At budget 0.3 the most accurate ResNet-20 policies keep one costly group wide (the
    stage-3 residual stream at 56 to 64 of 64 channels) and shrink the rest: NSGA-II from the
    uniform seed and random proposals found that basin in some runs and not others."""
    out = [uniform]
    for g in space.groups:
        p = wall.project({**uniform.to_dict(), g.name: g.channels}, hold=g.name)
        if p not in out:
            out.append(p)
    return out
