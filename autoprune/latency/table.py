"""`LatencyTable`: measured per-op latencies of one device, with provenance and calibration.

File: ``latency_tables/<device>/<model>.json``. A table is refused when it was measured on
another device, runtime version or CPU; a corrupt file is refused naming the file.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from .devices import LATENCY_TABLES_DIR, TargetDevice, cpu_model
from .stats import LatencyStat

TABLE_FORMAT = "autoprune-latency-table-v1"


@dataclass(frozen=True)
class Calibration:
    """measured_ms ~= scale * (sum of per-op ms) + offset_ms, fitted on whole-model runs. An op
    kind in ``kind_scales`` has its own scale instead (depthwise convs, where a model has them
    and a separate scale fits better: timed alone they cost far more than inside a network,
    where part of their time hides behind the convs around them)."""

    scale: float
    offset_ms: float
    n: int
    fit_mean_abs_pct: float  # in-sample mean abs % error of the fit
    kind_scales: dict[str, float] = field(default_factory=dict)

    def scale_for(self, kind: str) -> float:
        return self.kind_scales.get(kind, self.scale)

    def to_dict(self) -> dict[str, Any]:
        d = {"scale": self.scale, "offset_ms": self.offset_ms, "n": self.n,
             "fit_mean_abs_pct": self.fit_mean_abs_pct}
        if self.kind_scales:
            d["kind_scales"] = dict(sorted(self.kind_scales.items()))
        return d


@dataclass
class LatencyTable:
    """Mutable while profiling (entries are added); saved atomically after each batch."""

    device: str
    runtime: str
    versions: dict[str, str]
    cpu: str
    threads: int
    batch: int
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc)
                         .isoformat(timespec="seconds"))
    entries: dict[str, LatencyStat] = field(default_factory=dict)
    calibration: dict[str, Calibration] = field(default_factory=dict)
    path: Path | None = None
    # one record per profile run that added entries to the table after its first: when, how
    # many, how many earlier entries it measured again, and the factor applied to the new ones
    extensions: list[dict[str, Any]] = field(default_factory=list)

    # ------------------------------------------------------------------ identity
    @classmethod
    def new(cls, device: TargetDevice, versions: dict[str, str]) -> LatencyTable:
        return cls(device.name, device.runtime, dict(versions), _cpu_for(device),
                   device.threads, device.batch)

    def mismatch(self, device: TargetDevice, versions: dict[str, str]) -> str | None:
        """What makes this table unusable for ``device`` with ``versions`` (None: usable)."""
        if self.device != device.name:
            return f"it was measured on device {self.device!r}, not {device.name!r}"
        if self.runtime != device.runtime:
            return f"it was measured with {self.runtime}, the device uses {device.runtime}"
        for key, want in versions.items():
            have = self.versions.get(key)
            if have != want:
                return f"its {key} is {have!r} but this machine has {want!r}"
        here = _cpu_for(device)
        if self.cpu != here:
            why = f"it was measured on CPU {self.cpu!r}, this is {here!r}"
            if here.startswith(f"{self.cpu} ("):  # a table written before the family was kept
                why += " (the table does not say which generation: it could be another)"
            return why
        if (self.threads, self.batch) != (device.threads, device.batch):
            return (f"it was measured with {self.threads} thread(s), batch {self.batch}; the "
                    f"device says {device.threads}, batch {device.batch}")
        return None

    def check(self, device: TargetDevice, versions: dict[str, str], *, model: str) -> None:
        why = self.mismatch(device, versions)
        if why:
            raise UserError(f"latency table {str(self.path)!r} does not fit: {why}; rebuild it "
                            f"with `{profile_command(device.name, model, self.path)} --rebuild`")

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": TABLE_FORMAT,
            "provenance": {"device": self.device, "runtime": self.runtime,
                           "versions": self.versions, "cpu": self.cpu, "threads": self.threads,
                           "batch": self.batch, "created": self.created,
                           **({"extensions": self.extensions} if self.extensions else {})},
            "entries": {k: [v.median_ms, v.iqr_ms, v.n]
                        for k, v in sorted(self.entries.items())},
            "calibration": {k: c.to_dict() for k, c in sorted(self.calibration.items())},
        }

    def save(self, path: str | Path | None = None) -> Path:
        from .._io import write_json

        path = Path(path or self.path)
        self.path = path
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
            if d.get("format") != TABLE_FORMAT:
                raise ValueError(f"format is {d.get('format')!r}, expected {TABLE_FORMAT!r}")
            p = d["provenance"]
            entries = {k: LatencyStat(float(v[0]), float(v[1]), int(v[2]))
                       for k, v in d["entries"].items()}
            from .ops import OpSig

            for k in entries:
                OpSig.from_key(k)  # every key must parse
            calibration = {k: Calibration(float(c["scale"]), float(c["offset_ms"]), int(c["n"]),
                                          float(c["fit_mean_abs_pct"]),
                                          {str(kind): float(v) for kind, v
                                           in c.get("kind_scales", {}).items()})
                           for k, c in d.get("calibration", {}).items()}
            return cls(p["device"], p["runtime"], dict(p["versions"]), p["cpu"],
                       int(p["threads"]), int(p["batch"]), p["created"], entries, calibration,
                       path, [dict(x) for x in p.get("extensions", [])])
        except FileNotFoundError:
            raise
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            raise UserError(f"latency table {str(path)!r} is corrupt ({type(e).__name__}: {e});"
                            " delete it and re-run `autoprune profile`") from e


def _cpu_for(device: TargetDevice) -> str:
    # A remote board's CPU is not this host's: name it by the target instead.
    if device.remote is not None:
        return json.dumps(device.target, sort_keys=True)
    return cpu_model()


def profile_command(device: str, model: str, path: Path | None) -> str:
    """``autoprune profile`` for the table at ``path``: with ``--tables`` or ``--table`` where
    that is not the default place, so the command a message suggests builds that table."""
    import shlex

    words = ["autoprune", "profile", "--target-device", device, "--model", model]
    path = Path(path) if path is not None else None
    if path is not None and path != table_path(device, model):
        if path == table_path(device, model, path.parent.parent):
            words += ["--tables", str(path.parent.parent)]
        else:
            words += ["--table", str(path)]
    return shlex.join(words)


def table_path(device: str, model_key: str, root: Path | None = None) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_key)
    return (root or LATENCY_TABLES_DIR) / device / f"{safe}.json"
