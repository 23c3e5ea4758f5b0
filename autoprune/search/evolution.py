"""Optuna searcher: NSGA-II on (val accuracy up, predicted latency down) with the budget as a
constraint; ``cmaes`` and ``tpe`` samplers optimise accuracy alone.

Each group's genome is an index into its channel grid. An over-budget proposal is projected
onto the budget before evaluation (``BudgetWall.project``: every group shrinks toward its
minimum by one common factor, so the genome of a later group still matters), so every
evaluated policy is feasible, as the design asks; the projected policy is what is scored and
stored on the trial. The uniform policy at the budget is
enqueued as a seed and takes part in breeding: the objective reads ``trial.relative_params``
first (without that Optuna 5 gives an enqueued trial no NSGA-II generation, so it is never a
parent).
"""

from __future__ import annotations

import logging
import os
import time
import warnings

from ..errors import UserError
from .base import SearchContext, Searcher
from .baselines import best_uniform

log = logging.getLogger(__name__)

SAMPLERS = ("nsga2", "cmaes", "tpe")


class EvolutionSearcher(Searcher):
    name = "evolution"

    def __init__(self, space, predictor, budget_ms, *, seed: int = 0, population: int = 32,
                 sampler: str = "nsga2"):
        super().__init__(space, predictor, budget_ms, seed=seed)
        if sampler not in SAMPLERS:
            raise UserError(f"unknown `--sampler` {sampler!r}; choose one of "
                            f"{', '.join(SAMPLERS)}")
        if population < 2:
            raise UserError(f"`--population` must be >= 2, got {population}")
        self.population, self.sampler_name = population, sampler

    def options(self) -> dict:
        return {"population": self.population, "sampler": self.sampler_name}

    def _sampler(self, worker_seed: int):
        import optuna

        if self.sampler_name == "nsga2":
            return optuna.samplers.NSGAIISampler(population_size=self.population,
                                                 seed=worker_seed)
        if self.sampler_name == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=worker_seed, warn_independent_sampling=False)
        return optuna.samplers.TPESampler(seed=worker_seed)

    def _genome(self, policy) -> dict[str, int]:
        return {g.name: g.choices.index(policy[g.name]) for g in self.space.groups}

    def run(self, ctx: SearchContext) -> None:
        import optuna
        from optuna.trial import TrialState

        # Workers sharing a study must not share a seed: mix in the process id. A study of
        # one process keeps `--seed` as it is, so the same command finds the same policies.
        worker_seed = (self.seed * 1_000_003 + os.getpid()) % (2**31) \
            if getattr(ctx, "shared_storage", False) else self.seed
        multi = self.sampler_name == "nsga2"
        study = open_optuna_study(ctx, self._sampler(worker_seed),
                                  directions=["maximize", "minimize"] if multi else ["maximize"])
        if not study.trials:
            seed_policy = best_uniform(self.space, self.predictor, self.budget_ms)
            study.enqueue_trial(self._genome(seed_policy), skip_if_exists=True)

        groups = self.space.groups

        def objective(trial):
            _ = trial.relative_params  # makes an enqueued seed part of NSGA-II breeding
            proposed = {g.name: g.choices[trial.suggest_int(g.name, 0, len(g.choices) - 1)]
                        for g in groups}
            policy = self.wall.project(proposed)
            cand = ctx.evaluate(policy, trial.number)
            ctx.on_candidate(cand)
            trial.set_user_attr("policy", policy.to_dict())
            if multi:  # only NSGA-II reads constraints (CMA-ES warns that it ignores them)
                trial.set_constraint("latency_over_budget_ms", cand.latency_ms - self.budget_ms)
            return (cand.val_acc, cand.latency_ms) if multi else cand.val_acc

        done = sum(1 for t in study.trials if t.state == TrialState.COMPLETE)
        if done >= ctx.n_trials:
            return
        study.optimize(objective, n_trials=ctx.n_trials - done, gc_after_trial=False,
                       callbacks=[optuna.study.MaxTrialsCallback(
                           ctx.n_trials, states=(TrialState.COMPLETE,))])


def _sqlite_wal(storage) -> None:
    """Every later connection of a SQLite storage uses WAL with synchronous=NORMAL."""
    from sqlalchemy import event

    engine = storage.engine
    if engine.dialect.name != "sqlite":
        return

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection, _record):
        cur = dbapi_connection.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    engine.dispose()  # connections opened while the schema was created predate the pragmas


def open_optuna_study(ctx, sampler, *, directions: list[str]):
    """Create (once) or load the Optuna study.

    A study's own SQLite file belongs to one process (the study lock): a killed process's
    RUNNING trials are failed and retried at once when the study resumes. Shared storage
    (``--storage URL``) gets heartbeats instead, so a dead worker's trials are retried by the
    others after the grace period. SQLite runs in WAL mode with synchronous=NORMAL: a killed
    process loses nothing committed, and a trial costs ~31 ms of searcher and storage time
    instead of ~86 (``bench/optuna_storage.py``)."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    shared = getattr(ctx, "shared_storage", False)
    last_error = None
    for attempt in range(5):  # workers starting together can race on schema creation
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                heartbeat = {"heartbeat_interval": 10, "grace_period": 30,
                             "heartbeat_stale_trial_callback":
                             optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)
                             } if shared else {}
                storage = optuna.storages.RDBStorage(ctx.storage_url, **heartbeat)
            _sqlite_wal(storage)
            study = optuna.create_study(study_name=ctx.study_name, storage=storage,
                                        sampler=sampler, directions=directions,
                                        load_if_exists=True)
            break
        except Exception as e:  # sqlalchemy errors of a concurrent creation
            last_error = e
            time.sleep(0.5 * (attempt + 1))
    else:
        raise UserError(f"cannot open Optuna storage {ctx.storage_url!r} ({last_error}); check "
                        "`--storage`") from last_error
    if getattr(ctx, "recover_stale", False):
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            params = t.system_attrs.get("fixed_params") or t.params
            if params:
                study.enqueue_trial(dict(params))
    return study
