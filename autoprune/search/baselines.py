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


def uniform_ladder(space, predictor, budget_ms: float, n: int, *,
                   step: float = 0.95) -> list[Policy]:
    """`best_uniform`, then up to ``n - 1`` fallbacks: each the largest uniform policy predicted
    at most ``step`` x the latency of the one before (so each is a distinct, cheaper policy,
    however coarse the grid). Stops early where no uniform policy is that much cheaper."""
    out = [best_uniform(space, predictor, budget_ms)]
    while len(out) < n:
        target = step * predictor.predict(out[-1])
        nxt = best_uniform(space, predictor, target)
        if predictor.predict(nxt) > target:  # even the cheapest uniform policy is over it
            break
        out.append(nxt)
    return out


class UniformSearcher(Searcher):
    """Every group keeps the same fraction, the largest that fits; plus up to ``fallbacks``
    cheaper uniform policies (`uniform_ladder`, each predicted at most 0.95 x the one before,
    fewer where the space's floor is closer). The measured check that ends a search takes the
    most accurate that fits *as measured*: with the best alone, a predictor a few percent
    optimistic on this machine left uniform with no winner within the budget x 1.05 (seen:
    1.06 to 1.07 x at budget 0.3, where the searchers had others to fall back on)."""

    name = "uniform"
    fallbacks = 2

    def run(self, ctx: SearchContext) -> None:
        ladder = uniform_ladder(self.space, self.predictor, self.budget_ms, 1 + self.fallbacks)
        for trial, policy in enumerate(ladder):
            if trial not in ctx.done_trials:
                ctx.on_candidate(ctx.evaluate(policy, trial))


class RandomSearcher(Searcher):
    """Random feasible policies: each group draws a keep ratio uniformly, and the draw is
    projected onto the budget (``BudgetWall.project``: one common shrink, so no group is
    favoured by its position). A draw that projects onto a policy already evaluated is drawn
    again (up to ``redraws`` times, then moved to a neighbour not yet evaluated: see
    ``BudgetWall.unseen_near``): at budget 0.3 on a 4-channel grid 300 draws gave only 229 to
    239 distinct policies. Trial i draws from its own seeded generators, so a resumed study
    proposes the same."""

    name = "random"
    redraws = 20

    def propose(self, trial: int, known=lambda p: False) -> Policy:
        for attempt in range(self.redraws):
            rng = np.random.default_rng([self.seed, trial] if attempt == 0
                                        else [self.seed, trial, attempt])
            policy = self.wall.draw(rng)
            if not known(policy):
                return policy
        return self.wall.unseen_near(policy, known, rng)

    def run(self, ctx: SearchContext) -> None:
        for trial in range(ctx.n_trials):
            if trial in ctx.done_trials:
                continue
            ctx.on_candidate(ctx.evaluate(self.propose(trial, ctx.known), trial))
