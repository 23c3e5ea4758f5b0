"""Baselines with the same evaluator: one uniform keep ratio, and random feasible policies."""

from __future__ import annotations

import numpy as np

from ..policy import Policy
from .base import SearchContext, Searcher


def best_uniform(space, predictor, budget_ms: float) -> Policy:
    """The largest uniform keep ratio whose policy meets the budget (bisection on the ratio;
    the policy is a step function of it, so 40 halvings pin the last feasible step)."""
    if predictor.predict(space.full()) <= budget_ms:
        return space.full()
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if predictor.predict(space.uniform(mid)) <= budget_ms:
            lo = mid
        else:
            hi = mid
    return space.uniform(lo)


class UniformSearcher(Searcher):
    """One candidate: every group keeps the same fraction, the largest that fits."""

    name = "uniform"

    def run(self, ctx: SearchContext) -> None:
        policy = best_uniform(self.space, self.predictor, self.budget_ms)
        ctx.on_candidate(ctx.evaluate(policy, 0))


class RandomSearcher(Searcher):
    """Random feasible policies: each group draws a keep ratio uniformly, and the draw is
    projected onto the budget (``BudgetWall.project``: one common shrink, so no group is
    favoured by its position). Trial i draws from its own seeded generator, so a resumed
    study proposes the same."""

    name = "random"

    def propose(self, trial: int) -> Policy:
        rng = np.random.default_rng([self.seed, trial])
        wanted = {g.name: g.keep_for_ratio(float(rng.uniform(0.0, 1.0)))
                  for g in self.space.groups}
        return self.wall.project(wanted)

    def run(self, ctx: SearchContext) -> None:
        for trial in range(ctx.n_trials):
            if trial in ctx.done_trials:
                continue
            ctx.on_candidate(ctx.evaluate(self.propose(trial), trial))
