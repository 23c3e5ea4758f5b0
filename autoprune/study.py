"""A study: one run folder ``runs/<name>/`` that a search can be killed in and resumed from.

    config.json        frozen at creation; a resume with a different config is refused
    candidates.jsonl   one line per evaluated candidate, flushed and fsynced as it lands
    optuna.db          Optuna storage of the evolution searcher (or --storage URL)
    amc/               DDPG agent, replay buffer and RNG checkpoints
    measured.json      whole-model latencies measured on the device by the check that ends
                       a search (the best candidates, the uniform policy, the unpruned model)
    best_policy.json, pareto.json, pareto.png, summary.json    results

A killed process leaves at most a torn last line in candidates.jsonl (dropped on load; in a
study shared by workers, which may be appending, ended with a newline and skipped) and
RUNNING Optuna trials (failed and re-enqueued on resume; their policies, if already logged,
come from the cache and are not evaluated again).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from ._io import atomic_write, write_json
from .errors import UserError
from .evaluate import Candidate, first_measured_fit, policy_key, ranked
from .policy import Policy

log = logging.getLogger(__name__)

# Keys of config.json that define a study: a resume must match them exactly.
IDENTITY_KEYS = ("model", "weights_sha256", "data", "device", "budget", "budget_ms", "searcher",
                 "searcher_options", "seed", "space", "evaluator", "reward")


def config_differences(saved: dict[str, Any], config: dict[str, Any]) -> str | None:
    """How ``config`` differs from ``saved`` in the keys that define a study, as a refusal
    words it ("a different K (saved vs now new) and N more (...)"), or None where they
    agree."""
    diffs = [k for k in IDENTITY_KEYS if saved.get(k) != config.get(k)]
    if not diffs:
        return None
    k = diffs[0]
    return (f"a different {k} ({_short(saved.get(k))} vs now {_short(config.get(k))})"
            + (f" and {len(diffs) - 1} more ({', '.join(diffs[1:])})" if diffs[1:] else ""))


def identity(config: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``config`` that define a study, as JSON reads them back."""
    return json.loads(json.dumps({k: config.get(k) for k in IDENTITY_KEYS}))


class Study:
    def __init__(self, root: Path, config: dict[str, Any], *, storage_url: str | None = None):
        self.root = root
        self.config = config
        self.shared = storage_url is not None
        self.storage_url = storage_url or f"sqlite:///{(root / 'optuna.db').resolve()}"
        self.candidates: list[Candidate] = []
        self._seen: set[tuple] = set()  # `_identity` of each of ``candidates``
        self._read_to = 0  # bytes of candidates.jsonl read (`refresh` reads on from there)
        self._measured: dict[str, Any] | None = None

    # ------------------------------------------------------------------ open / resume
    @classmethod
    def open(cls, root: str | Path, config: dict[str, Any], *,
             storage_url: str | None = None) -> Study:
        root = Path(root)
        study = cls(root, config, storage_url=storage_url)
        cfg_path = root / "config.json"
        if cfg_path.is_file():
            try:
                saved = json.loads(cfg_path.read_text())
            except json.JSONDecodeError as e:
                raise UserError(f"study config {str(cfg_path)!r} is corrupt ({e.msg}); move the "
                                "folder away or pick another `--study`") from e
            differs = config_differences(saved, config)
            if differs:
                raise UserError(f"study {root.name!r} was created with {differs}; resume with "
                                "the original options or pick another `--study`")
            if saved.get("versions") != config.get("versions"):
                log.warning("study %s was created with other library versions: %s",
                            root.name, saved.get("versions"))
            study.config = saved
        else:
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create study folder {str(root)!r} ({e.strerror}); "
                                "choose another `--study` or `--runs`") from e
            write_json(cfg_path, config)
        study._take_lock()
        study._load_candidates()
        return study

    @classmethod
    def load(cls, root: str | Path) -> Study:
        """An existing study, read-only (for reports)."""
        root = Path(root)
        cfg = root / "config.json"
        if not cfg.is_file():
            raise UserError(f"no study at {str(root)!r} (no config.json); run `autoprune "
                            "search --study NAME` first")
        study = cls(root, json.loads(cfg.read_text()))
        study._load_candidates(repair=False)
        return study

    def _take_lock(self) -> None:
        lock = self.root / "lock.json"
        if lock.is_file():
            try:
                held = json.loads(lock.read_text())
            except json.JSONDecodeError:
                held = {}
            pid, host = held.get("pid"), held.get("host")
            alive = host == socket.gethostname() and isinstance(pid, int) and _pid_alive(pid)
            if alive and pid != os.getpid() and not self.shared:
                raise UserError(f"study {self.root.name!r} is being run by process {pid}; wait "
                                "for it, or share it between workers with `--storage URL`")
        write_json(lock, {"pid": os.getpid(), "host": socket.gethostname(),
                          "since": time.time()})

    def release(self) -> None:
        lock = self.root / "lock.json"
        try:
            if json.loads(lock.read_text()).get("pid") == os.getpid():
                lock.unlink()
        except (OSError, json.JSONDecodeError):
            pass  # already gone or unreadable: nothing of ours to release

    # ------------------------------------------------------------------ candidates
    @property
    def log_path(self) -> Path:
        return self.root / "candidates.jsonl"

    def _load_candidates(self, *, repair: bool = True) -> None:
        self.candidates, self._seen, self._read_to = [], set(), 0
        if not self.log_path.is_file():
            return
        raw = self.log_path.read_bytes()
        end = raw.rfind(b"\n") + 1  # past the last whole line: the rest was torn by a kill
        self._read_to = end
        self._take_lines(raw[:end])
        if end < len(raw) and repair:
            if self.shared:  # other workers append to it: end the torn line rather than cut
                log.warning("ending a torn line of %s (skipped from now on)", self.log_path)
                with open(self.log_path, "a") as f:
                    f.write("\n")
            else:
                log.warning("dropping a torn last line of %s", self.log_path)
                with open(self.log_path, "r+b") as f:
                    f.truncate(end)

    def _take_lines(self, raw: bytes) -> list[Candidate]:
        """Add the candidates of whole log lines not already held; a line that is not a
        candidate (a torn line another worker's append ended) is skipped, not the rest."""
        new = []
        for line in raw.splitlines():
            if not line.strip():
                continue
            try:
                cand = Candidate.from_json(line.decode())
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                log.warning("skipping a line of %s that is not a candidate: %r", self.log_path,
                            line[:60])
                continue
            key = _identity(cand)
            if key not in self._seen:
                self._seen.add(key)
                self.candidates.append(cand)
                new.append(cand)
        return new

    def refresh(self) -> list[Candidate]:
        """The candidates other workers sharing this study's folder logged since this one last
        read the log (only whole lines), now also in ``candidates``; [] for a study of one
        process. Searching workers read them before each evaluation, so a policy one of them
        has evaluated is served from the cache instead of evaluated again, and before writing
        the results, so the study's best is the best of all workers."""
        if not self.shared:
            return []
        try:
            size = self.log_path.stat().st_size
        except FileNotFoundError:
            return []
        if size <= self._read_to:
            return []
        with open(self.log_path, "rb") as f:
            f.seek(self._read_to)
            raw = f.read(size - self._read_to)
        end = raw.rfind(b"\n") + 1
        self._read_to += end
        return self._take_lines(raw[:end])

    def append(self, cand: Candidate) -> None:
        with open(self.log_path, "a") as f:
            f.write(cand.to_json() + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._seen.add(_identity(cand))
        self.candidates.append(cand)

    def trials_done(self, searcher: str) -> dict[int, Policy]:
        """Trial number -> policy of the candidates ``searcher`` logged."""
        return {c.trial: c.policy for c in self.candidates if c.searcher == searcher}

    # ------------------------------------------------------------------ results
    def best(self) -> Candidate | None:
        """The most accurate feasible candidate that measured within the budget on the device
        (`verify`); without such a measurement, the most accurate feasible one by prediction
        (none measured yet, the check is off, or none measured fits: `verify` says so)."""
        order = ranked(self.candidates)
        m = self.measured
        if m.get("tolerance") is not None:
            fit = [c for c in order if (rec := m["policies"].get(policy_key(c.policy)))
                   and rec["over_budget"] <= 1 + m["tolerance"]]
            if fit:
                return fit[0]
        return order[0] if order else None

    def trust_prediction(self) -> None:
        """`--verify-top 0`: the best is the predicted one again; measurements are kept."""
        if self.measured.get("tolerance") is not None:
            self.measured["tolerance"] = None
            self._save_measured()

    # ------------------------------------------------------------------ measured check
    @property
    def measured_path(self) -> Path:
        return self.root / "measured.json"

    @property
    def measured(self) -> dict[str, Any]:
        """{"tolerance", "policies": {policy_key: `budget_measurer` record}}."""
        if self._measured is None:
            self._measured = {"tolerance": None, "policies": {}}
            if self.measured_path.is_file():
                try:
                    self._measured.update(json.loads(self.measured_path.read_text()))
                except json.JSONDecodeError as e:
                    raise UserError(f"{str(self.measured_path)!r} is corrupt ({e.msg}); delete "
                                    "it and re-run `autoprune search` to measure again") from e
        return self._measured

    def measurement(self, policy, measure=None) -> dict | None:
        """The policy's measured record; measured now (and saved) if ``measure`` is given."""
        k, known = policy_key(policy), self.measured["policies"]
        if k not in known and measure is not None:
            known[k] = measure(policy)
            self._save_measured()
        return known.get(k)

    def verify(self, measure, *, tolerance: float, top: int) -> Candidate | None:
        """Measure the best candidates on the device, most accurate first, until one is within
        the budget x (1 + ``tolerance``) (at most ``top``, then up to ``top`` more chosen by the
        rescaled predictor: see `evaluate.first_measured_fit`); that one becomes `best`.
        Returns it, or None when none fits. ``measure``: see `evaluate.budget_measurer`."""
        m = self.measured
        m["tolerance"] = tolerance
        self._save_measured()
        return first_measured_fit(self.candidates, measure, tolerance=tolerance, top=top,
                                  known=m["policies"],
                                  on_measured=lambda *_: self._save_measured())

    def _save_measured(self) -> None:
        """Write ``measured.json``. Workers that share a study (``--storage``) each run the
        check at their end: under a lock, what the others wrote is merged in first (their
        measurements of policies this one has not measured), so none is lost and none is
        measured twice by a later run."""
        if not self.shared:
            write_json(self.measured_path, self.measured)
            return
        import fcntl

        with open(self.root / "measured.json.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self.measured_path.is_file():
                    try:
                        theirs = json.loads(self.measured_path.read_text()).get("policies", {})
                    except json.JSONDecodeError:  # written atomically: never seen torn
                        theirs = {}
                    for k, rec in theirs.items():
                        self.measured["policies"].setdefault(k, rec)
                write_json(self.measured_path, self.measured)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def pareto(self) -> list[Candidate]:
        """Non-dominated candidates: no other is both faster and at least as accurate."""
        front: list[Candidate] = []
        seen = set()
        for c in sorted(self.candidates, key=lambda c: (c.latency_ms, -c.val_acc)):
            if c.policy in seen:
                continue
            seen.add(c.policy)
            if not front or c.val_acc > front[-1].val_acc:
                front.append(c)
        return front

    def write_results(self, reference: dict[str, Candidate]) -> dict[str, Path]:
        self.refresh()  # a shared study: the results hold every worker's candidates
        best = self.best()
        if best is None:
            raise UserError(f"study {self.root.name!r} has no feasible candidate yet; run "
                            "`autoprune search` on it")
        paths = {}
        paths["best_policy"] = write_json(self.root / "best_policy.json", {
            "channels": best.policy.to_dict(), "val_acc": best.val_acc,
            "latency_ms": best.latency_ms, "macs": best.macs, "params": best.params,
            "searcher": best.searcher, "trial": best.trial,
            "budget_ms": self.config["budget_ms"], "device": self.config["device"]["name"],
            **self._measured_fields(best)})
        front = self.pareto()
        paths["pareto"] = write_json(self.root / "pareto.json",
                                     [json.loads(c.to_json()) for c in front])
        summary = {"study": self.root.name, "candidates": len(self.candidates),
                   "feasible": sum(c.feasible for c in self.candidates),
                   "budget_ms": self.config["budget_ms"],
                   "best": json.loads(best.to_json()),
                   **{k: json.loads(v.to_json()) for k, v in reference.items()},
                   "measured": {k: self._measured_fields(c) for k, c in
                                {"best": best, **reference}.items()}}
        paths["summary"] = write_json(self.root / "summary.json", summary)
        paths["plot"] = self._plot(front, best, reference)
        return paths

    def _measured_fields(self, cand: Candidate) -> dict[str, Any]:
        """measured_ms / measured_iqr_ms / measured_over_budget (as the measured check counts
        it) / measured_unpruned_ms (measured beside it), or nothing if it was not measured."""
        rec = self.measurement(cand.policy)
        if rec is None:
            return {}
        return {"measured_ms": rec["median_ms"], "measured_iqr_ms": rec["iqr_ms"],
                "measured_over_budget": rec["over_budget"],
                **({"measured_unpruned_ms": rec["reference_ms"]} if "reference_ms" in rec
                   else {})}

    def _plot(self, front, best, reference) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=120)
        xs = [c.latency_ms for c in self.candidates]
        ys = [c.val_acc * 100 for c in self.candidates]
        ax.scatter(xs, ys, s=8, color="0.7", label=f"candidates ({len(xs)})")
        ax.plot([c.latency_ms for c in front], [c.val_acc * 100 for c in front], "-o", ms=3,
                color="tab:blue", label="Pareto front")
        ax.axvline(self.config["budget_ms"], color="tab:red", ls="--", lw=1, label="budget")
        markers = {"uniform": ("s", "tab:orange"), "unpruned": ("D", "tab:green")}
        for name, cand in reference.items():
            m, color = markers.get(name, ("^", "tab:purple"))
            ax.scatter([cand.latency_ms], [cand.val_acc * 100], marker=m, s=50, color=color,
                       label=name, zorder=3)
        ax.scatter([best.latency_ms], [best.val_acc * 100], marker="*", s=160, color="gold",
                   edgecolor="k", label="best feasible", zorder=4)
        measured = self.measurement(best.policy)
        if measured is not None:  # where it lands on the predicted axis: budget x its ratio
            ax.scatter([self.config["budget_ms"] * measured["over_budget"]],
                       [best.val_acc * 100], marker="x", s=60, color="k",
                       label="best, as measured on the device", zorder=5)
        ax.set(xlabel=f"predicted latency on {self.config['device']['name']} (ms)",
               ylabel="val accuracy (%)", title=f"study {self.root.name}")
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        path = self.root / "pareto.png"
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
        plt.close(fig)
        return path


def _identity(cand: Candidate) -> tuple:
    """What makes a logged candidate one entry: its searcher, trial and policy."""
    return cand.searcher, cand.trial, policy_key(cand.policy)


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return s if len(s) <= 60 else s[:57] + "..."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return True
