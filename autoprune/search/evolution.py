"""Optuna searcher: NSGA-II on (val accuracy up, predicted latency down) with the budget as a
constraint; ``cmaes`` and ``tpe`` samplers optimise accuracy alone.

Each group's genome is an index into its channel grid. An over-budget proposal is projected
onto the budget before evaluation (``BudgetWall.project``: every group shrinks toward its
minimum by one common factor, so the genome of a later group still matters), so every
evaluated policy is feasible, as the design asks; the projected policy is what is scored and
stored on the trial. A projected policy that an earlier trial evaluated is moved to a
neighbour not yet evaluated (``BudgetWall.unseen_near``), so every trial evaluates a new policy
wherever the space has one: at a tight budget projection sends many proposals onto the same
few policies. The trial's parameters are then rewritten to the genome of the policy it
evaluated (`write_genome`), so the sampler breeds from and learns on feasible policies, not
on the proposals they came from. The uniform policy at the budget, and for each group that
policy with the group kept whole (`seed_policies`), are enqueued as seeds and take part in
breeding: the objective reads ``trial.relative_params`` first (without that Optuna 5 gives an
enqueued trial no NSGA-II generation, so it is never a parent).
"""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
from pathlib import Path

import numpy as np

from ..errors import UserError, first_line
from .base import SearchContext, Searcher

log = logging.getLogger(__name__)

SAMPLERS = ("nsga2", "cmaes", "tpe")
# Shared storage (`--storage`): a worker's running trial records a heartbeat this often; one
# whose last heartbeat is older than the grace period belongs to a dead worker, and the next
# worker to start a trial marks it failed and runs its parameters again.
HEARTBEAT_INTERVAL_S = 10
HEARTBEAT_GRACE_S = 30


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
        from optuna.distributions import IntDistribution
        from optuna.study._constrained_optimization import _CONSTRAINTS_KEY
        from optuna.trial import TrialState

        # Workers sharing a study must not share a seed: mix in the process id. A study of
        # one process keeps `--seed` as it is, so the same command finds the same policies.
        worker_seed = (self.seed * 1_000_003 + os.getpid()) % (2**31) \
            if getattr(ctx, "shared_storage", False) else self.seed
        multi = self.sampler_name == "nsga2"
        # a logged candidate whose trial the storage does not hold yet (the process died
        # between the two) is proposed again first: served from the cache, under its number
        logged = {number: self._genome(policy)
                  for number, policy in getattr(ctx, "done_trials", {}).items()}
        seeds = [self._genome(p) for p in self.seeds()]
        study, callbacks = open_search_study(
            ctx, self._sampler(worker_seed),
            directions=["maximize", "minimize"] if multi else ["maximize"], logged=logged,
            seeds=seeds)

        groups = self.space.groups
        shared = getattr(ctx, "shared_storage", False)

        dists = {g.name: IntDistribution(0, len(g.choices) - 1) for g in groups}

        def objective(trial):
            if shared:  # a dead worker's trial that Optuna's heartbeat check cannot see
                fail_trials_without_heartbeat(study)
            _ = trial.relative_params  # makes an enqueued seed part of NSGA-II breeding
            # shared storage: a round trip to the server for every parameter and attribute
            # Optuna writes, so the trial's are written at once, in two transactions
            # (`write_running_trial`): its genome before the evaluation, its result after
            genome = proposed_params(trial, dists) if shared else \
                {name: trial.suggest_int(name, d.low, d.high) for name, d in dists.items()}
            policy = self.wall.project({g.name: g.choices[genome[g.name]] for g in groups})
            # a repeat is moved to a neighbour not yet evaluated, unless the trial was enqueued:
            # the seed, or a logged policy proposed again to be served from the cache (the
            # trial read its enqueued parameters from the storage when it began: no query)
            if not trial._fixed_params:
                if ctx.known(policy):
                    policy = self.wall.unseen_near(
                        policy, ctx.known, np.random.default_rng([worker_seed, trial.number]))
                genome = self._genome(policy)
                if not shared:
                    write_genome(study, trial, genome)
            if shared:
                write_running_trial(study, trial, params=genome, dists=dists)
            cand = ctx.evaluate(policy, trial.number)
            ctx.on_candidate(cand)
            user_attrs = {"policy": policy.to_dict()}
            # only NSGA-II reads constraints (CMA-ES warns that it ignores them)
            constraint = {"latency_over_budget_ms": cand.latency_ms - self.budget_ms} \
                if multi else {}
            if shared:
                write_running_trial(study, trial, user_attrs=user_attrs, system_attrs={
                    f"{_CONSTRAINTS_KEY}:{k}": v for k, v in constraint.items()})
            else:
                trial.set_user_attr("policy", user_attrs["policy"])
                for key, value in constraint.items():
                    trial.set_constraint(key, value)
            return (cand.val_acc, cand.latency_ms) if multi else cand.val_acc

        done = sum(1 for t in study.trials if t.state == TrialState.COMPLETE)
        if done >= ctx.n_trials:
            return
        study.optimize(objective, n_trials=ctx.n_trials - done, gc_after_trial=False,
                       callbacks=callbacks)


def write_genome(study, trial, genome: dict[str, int]) -> None:
    """Make a running ``trial``'s parameters the genome of the policy it evaluates (the
    projected proposal, or the neighbour a repeat moved to), so that NSGA-II breeds from
    policies that fit the budget rather than from the proposals they were projected from (and
    CMA-ES and TPE model the policies that were scored).

    At a tight budget most proposals lie far over it, and many project onto policies unlike
    either parent (one common shrink decided by the whole genome); with the proposals kept as
    the parents, evolution at budget 0.3 did no better than random draws (20.02% against
    20.10%, `bench/README.md`). Written back ("Lamarckian" repair), a child of two parents near
    the budget lies near it too and keeps their shape.

    Optuna's in-memory storage (a study's own file is sampled from a copy in memory) overwrites
    a parameter; an RDB storage (``--storage URL``) refuses a second value for one, so its rows
    are updated in one transaction. Other workers read this trial's parameters only once it is
    complete."""
    changed = {name: idx for name, idx in genome.items() if trial.params[name] != idx}
    if not changed:
        return
    if _rdb_backend(study) is not None:
        write_running_trial(study, trial, params=changed, dists=trial.distributions)
        return
    for name, idx in changed.items():
        study._storage.set_trial_param(trial._trial_id, name, idx, trial.distributions[name])
        trial._cached_frozen_trial.params[name] = idx


def proposed_params(trial, dists: dict) -> dict:
    """What ``trial.suggest_int`` (or another ``suggest_*``) would return for each of ``dists``,
    without writing any of it to the storage: `write_running_trial` then writes the trial's
    parameters in one transaction. Follows Optuna's `Trial._suggest`, in the same order: a
    value the trial already holds (a retried trial's), an enqueued one, a relative one (NSGA-II
    breeding), else the sampler's independent draw (NSGA-II's first generation)."""
    from optuna import pruners
    from optuna.distributions import _get_single_value

    frozen = trial._get_latest_trial()
    out = {}
    for name, dist in dists.items():
        if name in frozen.distributions:
            out[name] = frozen.params[name]
        elif trial._is_fixed_param(name, dist):
            out[name] = trial._fixed_params[name]
        elif dist.single():
            out[name] = _get_single_value(dist)
        elif trial._is_relative_param(name, dist):
            out[name] = trial.relative_params[name]
        else:
            out[name] = trial.study.sampler.sample_independent(
                pruners._filter_study(trial.study, frozen), frozen, name, dist)
    return out


def write_running_trial(study, trial, *, params: dict | None = None, dists: dict | None = None,
                        user_attrs: dict | None = None, system_attrs: dict | None = None) -> None:
    """Set a running ``trial``'s parameters (``params``: name -> value in ``dists``), user
    and system attributes in ``study``'s RDB storage, in one transaction of plain statements,
    and in the trial as the objective sees it. A parameter or attribute already set is
    overwritten.

    Optuna writes each parameter and attribute in a transaction of its own, several queries
    each, and on a database server each query is a round trip: a shared PostgreSQL trial cost
    134 ms of sampler and storage that way, 91 ms written at once (`bench/optuna_storage.py`,
    one run on a 2-core machine). Raises Optuna's
    `UpdateFinishedTrialError` where the trial is no longer running (another worker failed it
    as stale), as Optuna's own calls do."""
    import json

    from optuna.distributions import distribution_to_json
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.storages._rdb import models
    from optuna.trial import TrialState
    from sqlalchemy import bindparam, delete, insert, select, update

    backend = _rdb_backend(study)
    if backend is None:
        raise TypeError("write_running_trial writes to an RDB storage")
    frozen, params = trial._cached_frozen_trial, params or {}
    trial_id = trial._trial_id
    new = [{"trial_id": trial_id, "param_name": name,
            "param_value": dists[name].to_internal_repr(value),
            "distribution_json": distribution_to_json(dists[name])}
           for name, value in params.items() if name not in frozen.distributions]
    changed = [{"b_trial": trial_id, "b_name": name,
                "b_value": dists[name].to_internal_repr(value)}
               for name, value in params.items()
               if name in frozen.distributions and frozen.params[name] != value]
    tp, tt = models.TrialParamModel.__table__, models.TrialModel.__table__
    with backend.engine.begin() as conn:
        state = conn.execute(select(tt.c.state).where(tt.c.trial_id == trial_id)
                             .with_for_update()).scalar_one()
        if state != TrialState.RUNNING:
            raise UpdateFinishedTrialError(
                f"trial #{trial.number} is {state.name}, not running: it cannot be updated")
        if new:
            conn.execute(insert(tp), new)
        if changed:
            conn.execute(update(tp).where(tp.c.trial_id == bindparam("b_trial"),
                                          tp.c.param_name == bindparam("b_name"))
                         .values(param_value=bindparam("b_value")), changed)
        for model, attrs in ((models.TrialUserAttributeModel, user_attrs),
                             (models.TrialSystemAttributeModel, system_attrs)):
            if attrs:
                t = model.__table__
                conn.execute(delete(t).where(t.c.trial_id == trial_id,
                                             t.c.key.in_(list(attrs))))
                conn.execute(insert(t), [{"trial_id": trial_id, "key": k,
                                          "value_json": json.dumps(v)}
                                         for k, v in attrs.items()])
    for name, value in params.items():
        frozen.distributions[name] = dists[name]
        frozen.params[name] = value
    frozen.user_attrs.update(user_attrs or {})
    frozen.system_attrs.update(system_attrs or {})


def fail_trials_without_heartbeat(study, *, grace_s: float = HEARTBEAT_GRACE_S) -> list[int]:
    """Mark failed, and hand to the storage's retry callback, the running trials of ``study``
    that never recorded a heartbeat and started more than ``grace_s`` ago. Returns their
    numbers.

    Optuna's own check (`optuna.storages.fail_stale_trials`, run before every trial of a
    shared study) judges a running trial by its last heartbeat and passes over one that has
    none. A trial is running from the moment a worker takes it in ``study.ask()``, and its
    first heartbeat is recorded only after ``ask`` returns (NSGA-II samples in between), so a
    worker killed in that gap left a trial running for good: the test that kills a worker
    caught it there, and an evolution seed taken that way was never tried. A live worker
    records the heartbeat a moment after ``ask``, so one missing after the grace period
    means the worker is dead. Start times are the workers' own clocks (Optuna's
    ``datetime_start``), which must agree to within the grace period."""
    import copy
    import datetime as dt

    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.storages._rdb import models
    from optuna.trial import TrialState
    from sqlalchemy import select

    backend = _rdb_backend(study)
    if backend is None or backend.get_heartbeat_interval() is None:
        return []
    trials, beats = models.TrialModel.__table__, models.TrialHeartbeatModel.__table__
    with backend.engine.connect() as conn:
        rows = conn.execute(
            select(trials.c.trial_id, trials.c.number, trials.c.datetime_start)
            .select_from(trials.outerjoin(beats, beats.c.trial_id == trials.c.trial_id))
            .where(trials.c.study_id == study._study_id, trials.c.state == TrialState.RUNNING,
                   beats.c.trial_id.is_(None))).all()
    cutoff = dt.datetime.now() - dt.timedelta(seconds=grace_s)
    retry = backend.get_heartbeat_stale_trial_callback()
    failed = []
    for trial_id, number, started in rows:
        if started is None or started.replace(tzinfo=None) > cutoff:
            continue
        try:
            if not study._storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:  # another worker failed it first
            continue
        log.warning("trial %d of the shared study was left running by a worker that stopped "
                    "before its first heartbeat; marked failed%s", number,
                    " and queued again" if retry is not None else "")
        failed.append(number)
        if retry is not None:
            retry(study, copy.deepcopy(study._storage.get_trial(trial_id)))
    return failed


def _rdb_backend(study):
    """The `RDBStorage` under ``study``'s storage (Optuna wraps one in a cache), or None where
    the storage is of another kind (the in-memory working copy)."""
    import optuna

    backend = getattr(study._storage, "_backend", study._storage)
    return backend if isinstance(backend, optuna.storages.RDBStorage) else None


def _sqlite_wal(storage, *, shared: bool = False) -> None:
    """Every later connection of a SQLite storage uses WAL with synchronous=NORMAL.

    ``shared`` (workers in other processes write the same file): every transaction also takes
    the write lock when it begins (``BEGIN IMMEDIATE``). Optuna hands out an enqueued trial by
    reading that it is WAITING and then setting it RUNNING, which PostgreSQL or MySQL make
    atomic with ``SELECT ... FOR UPDATE``; SQLite ignores that, so two workers could both take
    the same trial (seen: 9 of 60 enqueued trials taken by both of two processes; then one
    worker's result is refused, "Cannot tell a COMPLETE trial"). Transactions of one worker
    then wait for another's, which the file's busy timeout absorbs."""
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
        if shared:  # SQLAlchemy emits the BEGIN itself (below), not the sqlite3 module
            dbapi_connection.isolation_level = None
            cur = dbapi_connection.cursor()
            cur.execute("PRAGMA busy_timeout=30000")  # a writer waits for another's turn
            cur.close()

    if shared:
        @event.listens_for(engine, "begin")
        def _begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened while the schema was created predate the pragmas


def open_search_study(ctx, sampler, *, directions: list[str], logged=None, seeds=()):
    """The Optuna study a searcher samples from, and the ``optimize`` callbacks that keep the
    storage up to date. Returns ``(study, callbacks)``. ``seeds`` (parameters) are enqueued
    where the study has not tried them yet.

    Shared storage (``--storage URL``): the stored study itself, so every worker sees the
    others' trials as they happen, and a callback that stops at ``ctx.n_trials`` complete trials
    in total. The worker that creates the study enqueues the seeds, and only it (workers
    starting together could each find the study without them, and each enqueue them); the
    storage keeps those not yet taken for a later run.

    A study's own SQLite file (one process: the study lock): a working copy in memory, loaded
    from the file, that the sampler reads and writes; each finished trial is then written to the
    file in one transaction (`append_trial`). Optuna's storage writes every parameter, attribute
    and state change through its ORM, about 84 statements a trial; the copy cut the searcher and
    storage time from ~30 ms a trial to ~12.5, and `append_trial` to ~1.3
    (``bench/optuna_storage.py``). The file holds only finished
    trials, numbered as in the copy. A logged trial (``logged``: number -> parameters) that the
    file lacks is proposed again first: its process died after the candidate was logged and
    before the trial was written, so the copy gives it back its number and the cache serves it.
    Unfinished trials in a file that an older version sampled in (``RUNNING`` left by a killed
    process, ``WAITING`` ones it enqueued) are marked failed there and proposed again."""
    import optuna
    from optuna.trial import TrialState, create_trial

    if getattr(ctx, "shared_storage", False):
        def enqueue(created):
            if getattr(ctx, "identity", None) is not None:  # `check_shared_config`
                created.set_user_attr(CONFIG_ATTR, ctx.identity)
            for params in seeds:
                created.enqueue_trial(dict(params))

        study = open_optuna_study(ctx, sampler, directions=directions, on_create=enqueue)
        return study, [optuna.study.MaxTrialsCallback(ctx.n_trials,
                                                      states=(TrialState.COMPLETE,))]
    record = open_optuna_study(ctx, optuna.samplers.RandomSampler(), directions=directions)
    work = optuna.create_study(sampler=sampler, directions=directions)
    again = []
    for t in record.get_trials(deepcopy=False):
        if not t.state.is_finished():  # left by a killed process: we hold the study lock
            again.append(dict(t.system_attrs.get("fixed_params") or t.params))
            record._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            t = create_trial(state=TrialState.FAIL, params=t.params,
                             distributions=t.distributions, user_attrs=t.user_attrs,
                             system_attrs=t.system_attrs)
        work.add_trial(t)
    n = len(work.trials)
    for number in sorted(k for k in (logged or {}) if k >= n):
        work.enqueue_trial(dict(logged[number]))
    for params in again:
        if params:
            work.enqueue_trial(params)
    # the file holds finished trials only: after a kill, the seeds not tried yet are enqueued
    # again (a seed's trial keeps its enqueued parameters, however it ended)
    for params in seeds:
        work.enqueue_trial(dict(params), skip_if_exists=True)

    def write(_study, trial):
        append_trial(record, trial)

    return work, [write]


def append_trial(study, trial) -> None:
    """Add a finished ``trial`` to ``study``'s RDB storage in one transaction of plain INSERTs:
    what ``study.add_trial`` stores, without its ORM round trips (a query and a flush for every
    parameter and attribute, 17 of them here: ~12 ms of the ~20 ms a trial of evolution costs
    besides its evaluation, 5% of wall time at budget 0.3 where an evaluation takes 0.3 s).
    Optuna reads the rows back as the same trial (a test compares the two ways). A storage
    of another kind, or a trial with intermediate values, goes through ``add_trial``."""
    import json

    from optuna.distributions import distribution_to_json
    from sqlalchemy import func, insert, select

    backend = _rdb_backend(study)
    if backend is None or trial.intermediate_values:
        study.add_trial(trial)
        return
    from optuna.storages._rdb import models

    t = models.TrialModel.__table__
    with backend.engine.begin() as conn:
        number = conn.execute(select(func.count()).select_from(t)
                              .where(t.c.study_id == study._study_id)).scalar_one()
        trial_id = conn.execute(insert(t).values(
            number=number, study_id=study._study_id, state=trial.state,
            datetime_start=trial.datetime_start,
            datetime_complete=trial.datetime_complete)).inserted_primary_key[0]
        if trial.values is not None:
            rows = []
            for objective, value in enumerate(trial.values):
                stored, kind = models.TrialValueModel.value_to_stored_repr(value)
                rows.append({"trial_id": trial_id, "objective": objective, "value": stored,
                             "value_type": kind})
            conn.execute(insert(models.TrialValueModel.__table__), rows)
        params = [{"trial_id": trial_id, "param_name": name,
                   "param_value": trial.distributions[name].to_internal_repr(value),
                   "distribution_json": distribution_to_json(trial.distributions[name])}
                  for name, value in trial.params.items()]
        if params:
            conn.execute(insert(models.TrialParamModel.__table__), params)
        for model, attrs in ((models.TrialUserAttributeModel, trial.user_attrs),
                             (models.TrialSystemAttributeModel, trial.system_attrs)):
            if attrs:
                conn.execute(insert(model.__table__),
                             [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)}
                              for k, v in attrs.items()])


def redacted(url: str) -> str:
    """A storage URL as messages show it: its password, if any, as *** (also in a URL
    SQLAlchemy cannot parse: whatever stands between ``//user:`` and ``@``)."""
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except (sqlalchemy.exc.ArgumentError, ValueError):  # ValueError: a port that is no number
        return re.sub(r"(//[^/:@]*:)[^@/]*@", r"\1***@", url)


def check_storage(url: str) -> None:
    """Connect to the RDB storage ``url`` (`--storage`) once, before a search makes anything:
    one line naming the problem and the fix where it cannot be reached, its driver is missing
    or the URL is malformed (a password in it is not repeated)."""
    import sqlalchemy

    shown = redacted(url)
    try:
        sqlalchemy.engine.make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError) as e:
        raise UserError(f"`--storage` {shown!r} is not a database URL ({first_line(e)}); use "
                        "e.g. postgresql://USER@HOST/DB or sqlite:///shared.db") from e
    try:
        engine = sqlalchemy.create_engine(url)
    except ModuleNotFoundError as e:
        how = "`pip install 'autoprune[postgres]'`" if shown.startswith("postgresql") else \
            "install it with pip"
        raise UserError(f"`--storage {shown}` needs the database driver {e.name!r}, which is "
                        f"not installed: {how}") from e
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError) as e:
        raise UserError(f"`--storage` {shown!r} is not a usable database URL "
                        f"({first_line(e)})") from e
    try:
        with engine.connect():
            pass
    except Exception as e:  # sqlalchemy wraps the driver's errors: refused, no database, auth
        fix = "check that its folder exists and is writable" if shown.startswith("sqlite") \
            else "check that the database server runs, that the database exists, and the URL"
        raise UserError(f"cannot connect to `--storage` {shown!r} ({first_line(e)}); "
                        f"{fix}") from e
    finally:
        engine.dispose()


def _retrying(url: str, open_):
    """``open_()``, tried up to 5 times with a growing pause: workers starting together race
    to make Optuna's tables in an empty database (three at once on PostgreSQL: 6 of 12
    opened failed on a duplicate key) or a study. The last failure is one line naming
    ``url`` (its password hidden)."""
    for attempt in range(5):
        try:
            return open_()
        except Exception as e:  # sqlalchemy's errors of a concurrent creation
            last = e
            if attempt < 4:
                time.sleep(0.5 * (attempt + 1))
    raise UserError(f"cannot open Optuna storage {redacted(url)!r} ({first_line(last)}); "
                    "check `--storage`") from last


CONFIG_ATTR = "autoprune:config"  # a shared Optuna study's: what defines the autoprune study


def check_shared_config(url: str, study_name: str, identity: dict, *,
                        folder: Path | None = None, wait_s: float = 10.0) -> None:
    """Refuse to join the Optuna study ``study_name`` in the shared storage ``url`` where the
    worker that made it searched another study: the keys of its config that define a study
    (``identity``, `study.identity`), which it keeps in the Optuna study's user attributes,
    against this worker's; or where this worker's study ``folder`` (under its runs folder) has
    no config.json, so that the maker's folder is another.

    Workers share one runs folder (README), where config.json refuses a worker with other
    options. One given a runs folder of its own would make its own config.json, with a
    budget it checked on the device itself, so its trials' constraints would measure another
    budget, and its candidates would be missing from the others' results. The maker writes
    config.json before it makes the Optuna study. A new study passes (its maker stores its
    config), as does one made by a version that did not store it."""
    import optuna

    from ..study import config_differences

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def open_storage():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.storages.RDBStorage(url)

    storage = _retrying(url, open_storage)
    try:
        try:
            study_id = storage.get_study_id_from_name(study_name)
        except KeyError:
            return
        deadline = time.monotonic() + wait_s
        while (saved := storage.get_study_user_attrs(study_id).get(CONFIG_ATTR)) is None:
            if time.monotonic() > deadline:  # its maker is an older version, or died
                return
            time.sleep(0.5)  # its maker stores it a moment after making the study
    finally:
        storage.remove_session()
        storage.engine.dispose()
    differs = config_differences(saved, identity)
    if differs:
        raise UserError(f"the shared study {study_name!r} in `--storage {redacted(url)}` was "
                        f"made with {differs}: workers of one study search with the same "
                        "options and share one runs folder (`--runs` on a network file "
                        "system); use its options and runs folder, or pick another `--study`")
    if folder is not None and not (folder / "config.json").is_file():
        raise UserError(f"the shared study {study_name!r} in `--storage {redacted(url)}` was "
                        f"made in another runs folder: {str(folder.parent)!r} has no study "
                        f"{study_name!r}. Workers of one study share one runs folder (`--runs` "
                        "on a network file system): pass that folder, or pick another `--study`")


def open_optuna_study(ctx, sampler, *, directions: list[str], on_create=None):
    """Create (once) or load the Optuna study; ``on_create(study)`` is called by the process
    that created it (the storage's unique study name decides which, whoever races).

    A study's own SQLite file belongs to one process (the study lock): `open_search_study`
    retries a killed process's trial when the study resumes. Shared storage
    (``--storage URL``) gets heartbeats instead, so a dead worker's trials are retried by the
    others after the grace period. SQLite runs in WAL mode with synchronous=NORMAL: a killed
    process loses nothing committed, and a trial sampled in the file costs ~30 ms of searcher
    and storage time instead of ~54 to 86 (``bench/optuna_storage.py``); a study's own file
    is sampled from a copy in memory (`open_search_study`)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    shared = getattr(ctx, "shared_storage", False)

    def open_study():
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            heartbeat = {"heartbeat_interval": HEARTBEAT_INTERVAL_S,
                         "grace_period": HEARTBEAT_GRACE_S,
                         "heartbeat_stale_trial_callback":
                         optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)
                         } if shared else {}
            storage = optuna.storages.RDBStorage(ctx.storage_url, **heartbeat)
        _sqlite_wal(storage, shared=shared)
        try:
            return optuna.create_study(study_name=ctx.study_name, storage=storage,
                                       sampler=sampler, directions=directions), True
        except optuna.exceptions.DuplicatedStudyError:
            return optuna.load_study(study_name=ctx.study_name, storage=storage,
                                     sampler=sampler), False

    study, created = _retrying(ctx.storage_url, open_study)
    if created and on_create is not None:
        on_create(study)
    return study
