"""Optuna storage overhead per trial: what the evolution searcher pays the storage, outside the
candidate evaluation. Prints one JSON document.

    python bench/optuna_storage.py [--trials 150] [--repeats 3] [--postgres URL]

Runs the evolution searcher's own study (``open_optuna_study``: NSGA-II, population 32, 12
integer genes, a constraint, the ``MaxTrialsCallback``) with an objective that evaluates
nothing, so the time per trial is the searcher's and the storage's alone. Configurations:

- ``local``: a study's own SQLite file, as ``autoprune search`` opens it (``open_search_study``:
  sampled in an in-memory copy, each finished trial written to the file in one transaction);
- ``shared``: the same file passed as ``--storage URL`` (sampled in the file, WAL and
  heartbeats, the check for trials left without a heartbeat before every trial, and each
  trial's parameters, then its result, written in one transaction each, as the searcher runs
  it);
- ``shared-postgresql`` (with ``--postgres URL``, a database the bench may fill: each run makes
  a study of its own in it): the same on a PostgreSQL server, the storage for workers on
  several machines;
- ``shared-postgresql-per-call``: the same, each parameter and attribute written by Optuna's
  own call (a transaction each), as the searcher did before ``write_running_trial``;
- ``sqlite-direct``: what ``local`` did before the copy: sampled in the file itself (WAL, no
  heartbeat);
- ``rollback-journal+heartbeat``: what the searcher did before that (SQLite's default journal,
  heartbeats on every study), for comparison;
- ``journal-file``: Optuna's JournalStorage on a file, for reference.

Each configuration is run ``--repeats`` times in turn; the JSON gives the median and IQR of the
milliseconds per trial.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from optuna.distributions import IntDistribution  # noqa: E402

from autoprune.search.evolution import (  # noqa: E402
    fail_trials_without_heartbeat,
    open_optuna_study,
    open_search_study,
    proposed_params,
    write_running_trial,
)

DISTS = {f"g{i}": IntDistribution(0, 6) for i in range(12)}


def _objective(trial, study=None):
    """A trial as the searcher runs it, on ``study``'s shared storage where given (its
    parameters, then its result, each written in one transaction), else through Optuna's
    calls (a copy in memory, or what the searcher did on shared storage before)."""
    _ = trial.relative_params
    if study is not None:
        genes = proposed_params(trial, DISTS)
        write_running_trial(study, trial, params=genes, dists=DISTS)
        write_running_trial(study, trial, user_attrs={"policy": genes}, system_attrs={
            "constraints:latency_over_budget_ms": sum(genes.values()) - 40.0})
        genes = list(genes.values())
    else:
        genes = [trial.suggest_int(name, d.low, d.high) for name, d in DISTS.items()]
        trial.set_user_attr("policy", dict(zip(DISTS, genes, strict=True)))
        trial.set_constraint("latency_over_budget_ms", sum(genes) - 40.0)
    return sum(genes) / 72.0, float(sum(genes))


def _open(kind: str, folder: Path, n: int, *, postgres: str | None = None, name="bench"):
    """The study to optimize and its callbacks."""
    import optuna
    from optuna.trial import TrialState

    sampler = optuna.samplers.NSGAIISampler(population_size=32, seed=0)
    directions = ["maximize", "minimize"]
    url = postgres if kind.startswith("shared-postgresql") else \
        f"sqlite:///{folder / f'{kind}.db'}"
    count = [optuna.study.MaxTrialsCallback(n, states=(TrialState.COMPLETE,))]
    ctx = SimpleNamespace(storage_url=url, study_name=name,
                          shared_storage=kind.startswith("shared"), n_trials=n)
    if kind in ("local", "shared", "shared-postgresql", "shared-postgresql-per-call"):
        return open_search_study(ctx, sampler, directions=directions)
    if kind == "sqlite-direct":
        return open_optuna_study(ctx, sampler, directions=directions), count
    if kind == "rollback-journal+heartbeat":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            storage = optuna.storages.RDBStorage(
                url, heartbeat_interval=10, grace_period=30,
                heartbeat_stale_trial_callback=optuna.storages
                .RetryHeartbeatStaleTrialCallback(max_retry=3))
    else:
        from optuna.storages.journal import JournalFileBackend

        storage = optuna.storages.JournalStorage(
            JournalFileBackend(str(folder / "journal.log")))
    return optuna.create_study(study_name="bench", storage=storage, sampler=sampler,
                               directions=directions), count


def main() -> int:
    import optuna

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--postgres", metavar="URL",
                    help="a PostgreSQL database to time shared storage on as well "
                         "(postgresql://USER@HOST/DB; needs the `postgres` extra)")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kinds = ["local", "shared", "sqlite-direct", "rollback-journal+heartbeat", "journal-file"]
    if args.postgres:
        from autoprune.errors import UserError
        from autoprune.search.evolution import check_storage

        try:
            check_storage(args.postgres)
        except UserError as e:
            print(f"optuna_storage: {e}", file=sys.stderr)
            return 2
        kinds[2:2] = ["shared-postgresql", "shared-postgresql-per-call"]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    stamp = time.strftime("%Y%m%d%H%M%S")
    for r in range(args.repeats):
        for kind in kinds:
            with tempfile.TemporaryDirectory() as tmp:
                study, callbacks = _open(kind, Path(tmp), args.trials, postgres=args.postgres,
                                         name=f"bench-{stamp}-{r}-{kind}")

                def objective(trial, study=study, kind=kind):
                    if kind.startswith("shared"):  # what the searcher runs before each trial
                        fail_trials_without_heartbeat(study)
                    return _objective(trial, study if kind in (
                        "shared", "shared-postgresql") else None)

                t0 = time.perf_counter()
                study.optimize(objective, n_trials=args.trials, gc_after_trial=False,
                               callbacks=callbacks)
                ms = (time.perf_counter() - t0) / args.trials * 1000
                done = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
                if done != args.trials:  # a study of that name already held trials
                    raise SystemExit(f"optuna_storage: error: {kind} ran {done} trials, not "
                                     f"{args.trials}; time it on an empty study")
                times[kind].append(ms)
                print(f"repeat {r} {kind}: {ms:.1f} ms/trial", file=sys.stderr, flush=True)
    out = {"trials": args.trials, "repeats": args.repeats, "optuna": optuna.__version__,
           "ms_per_trial": {}}
    for kind, xs in times.items():
        q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
        out["ms_per_trial"][kind] = {"median": statistics.median(xs), "iqr": q[2] - q[0],
                                     "runs": xs}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
