"""Searchers: one interface (`Searcher`), a name -> class registry (`SEARCHERS`).

Optuna and stable-baselines3 are imported only when their searcher is used."""

from __future__ import annotations

from collections.abc import Callable

from .base import BudgetWall, SearchContext, Searcher
from .baselines import RandomSearcher, UniformSearcher, best_uniform


def _evolution() -> type[Searcher]:
    from .evolution import EvolutionSearcher

    return EvolutionSearcher


def _amc() -> type[Searcher]:
    from .amc import AMCSearcher

    return AMCSearcher


# name -> loader of the searcher class
SEARCHERS: dict[str, Callable[[], type[Searcher]]] = {
    "amc": _amc,
    "evolution": _evolution,
    "uniform": lambda: UniformSearcher,
    "random": lambda: RandomSearcher,
}

__all__ = ["SEARCHERS", "BudgetWall", "RandomSearcher", "SearchContext", "Searcher",
           "UniformSearcher", "best_uniform"]
