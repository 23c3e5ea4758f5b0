"""Target devices: the registry in ``latency_tables/devices.yaml`` plus a user's own file."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError

LATENCY_TABLES_DIR = Path(__file__).resolve().parents[2] / "latency_tables"
DEVICES_FILE = LATENCY_TABLES_DIR / "devices.yaml"
RUNTIMES = ("onnxruntime", "tvm")
_KEYS = {"description", "runtime", "provider", "target", "threads", "batch", "channel_multiple",
         "profile_multiple", "tuning", "remote", "cross_compiler"}
_REMOTE_KEYS = {"host", "port", "key", "tracker"}
_TUNING_KEYS = {"trials_per_task", "transfer", "transfer_candidates"}


@dataclass(frozen=True)
class Remote:
    """A TVM RPC endpoint: a server (host/port) or a tracker (host/port + key)."""

    host: str
    port: int
    key: str | None = None
    tracker: bool = False


@dataclass(frozen=True)
class TargetDevice:
    name: str
    runtime: str
    threads: int = 1
    batch: int = 1
    channel_multiple: int = 1
    provider: str | None = None  # onnxruntime execution provider
    target: dict[str, Any] | None = None  # TVM target as a JSON dict
    profile_multiple: int | None = None  # coarser table grid (tuned TVM kernels)
    tuning: dict[str, Any] = field(default_factory=dict)
    remote: Remote | None = None
    cross_compiler: str | None = None
    description: str = ""

    def __post_init__(self):
        where = f"device {self.name!r}"
        if self.runtime not in RUNTIMES:
            raise UserError(f"{where}: `runtime` must be one of {', '.join(RUNTIMES)}, got "
                            f"{self.runtime!r}")
        for key in ("threads", "batch", "channel_multiple"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"{where}: `{key}` must be a positive integer, got {v!r}")
        if self.runtime == "tvm" and not isinstance(self.target, dict):
            raise UserError(f"{where}: a tvm device needs `target` as a mapping, e.g. "
                            "{kind: llvm, num-cores: 1}")
        if not isinstance(self.tuning, dict) or set(self.tuning) - _TUNING_KEYS:
            raise UserError(f"{where}: `tuning` takes {', '.join(sorted(_TUNING_KEYS))}, got "
                            f"{self.tuning!r}")
        for key in ("trials_per_task", "transfer_candidates"):
            v = self.tuning.get(key, 1)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"{where}: `tuning.{key}` must be a positive integer, got {v!r}")
        if not isinstance(self.tuning.get("transfer", False), bool):
            raise UserError(f"{where}: `tuning.transfer` must be true or false, got "
                            f"{self.tuning['transfer']!r}")
        if self.runtime == "onnxruntime" and not self.provider:
            raise UserError(f"{where}: an onnxruntime device needs `provider`, e.g. "
                            "CPUExecutionProvider")

    @property
    def grid_multiple(self) -> int:
        """The channel multiple the latency table is measured on: ``profile_multiple`` where
        the device sets one (a coarser grid, interpolated between), else 1: every width of the
        search space's grid, however fine. Interpolating a 4-channel grid between multiples
        of 8 on cpu-ort put ResNet-56's narrow policies up to 16% too fast as a fraction of the
        unpruned model, since a width between two multiples runs on other kernels
        (bench/README.md, "ResNet-56 on the 4-channel grid")."""
        return self.profile_multiple or 1

    @property
    def tuned(self) -> bool:
        return self.runtime == "tvm" and bool(self.tuning)

    @property
    def is_cuda(self) -> bool:
        kind = (self.target or {}).get("kind")
        return kind == "cuda" or (self.provider or "").startswith("CUDA")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, name: str, raw: Any, *, source: str) -> TargetDevice:
        if not isinstance(raw, dict):
            raise UserError(f"{source}: device {name!r} must be a mapping of keys")
        unknown = sorted(set(raw) - _KEYS)
        if unknown:
            raise UserError(f"{source}: device {name!r} has unknown key {unknown[0]!r}; allowed "
                            f"keys are {', '.join(sorted(_KEYS))}")
        kw = dict(raw)
        remote = kw.pop("remote", None)
        if remote is not None:
            if not isinstance(remote, dict) or not {"host", "port"} <= set(remote) or \
                    set(remote) - _REMOTE_KEYS:
                raise UserError(f"{source}: device {name!r}: `remote` needs host and port "
                                "(and optionally key, tracker)")
            kw["remote"] = Remote(str(remote["host"]), int(remote["port"]), remote.get("key"),
                                  bool(remote.get("tracker", False)))
        if "runtime" not in kw:
            raise UserError(f"{source}: device {name!r} lacks `runtime` (onnxruntime or tvm)")
        return cls(name=name, **kw)

    def tvm_target(self):
        import tvm

        return tvm.target.Target(json.loads(json.dumps(self.target)))


def load_devices(path: str | Path | None = None) -> dict[str, TargetDevice]:
    """The built-in registry, plus (overriding by name) the devices in ``path``."""
    devices = _read(DEVICES_FILE)
    if path is not None:
        devices.update(_read(Path(path)))
    return devices


def _read(path: Path) -> dict[str, TargetDevice]:
    from .._io import read_yaml

    raw = read_yaml(path, what="devices file", option="--devices")
    if not isinstance(raw, dict) or not isinstance(raw.get("devices"), dict):
        raise UserError(f"devices file {str(path)!r} needs a top-level `devices:` mapping of "
                        "name -> settings")
    return {str(name): TargetDevice.from_dict(str(name), spec, source=str(path))
            for name, spec in raw["devices"].items()}


def get_device(name: str, devices_file: str | Path | None = None) -> TargetDevice:
    devices = load_devices(devices_file)
    if name not in devices:
        raise UserError(f"unknown target device {name!r}; known: {', '.join(devices)} "
                        "(`autoprune devices` lists them; add your own with `--devices FILE`)")
    return devices[name]


def runtime_versions() -> dict[str, str]:
    out = {}
    for mod, key in (("onnxruntime", "onnxruntime"), ("tvm", "tvm"), ("torch", "torch")):
        try:
            out[key] = __import__(mod).__version__
        except Exception:  # not installed or broken: reported as such
            out[key] = "unavailable"
    return out


# /proc/cpuinfo fields that tell one CPU from another where the model name does not
_X86_ID = ("cpu family", "model", "stepping")
_ARM_ID = ("CPU implementer", "CPU part", "CPU variant", "CPU revision")


def cpu_model(cpuinfo: str | None = None) -> str:
    """The host CPU as a latency table records it: the model name plus the family, model and
    stepping (x86) or implementer, part, variant and revision (ARM) of the first processor in
    ``cpuinfo`` (``/proc/cpuinfo``'s text by default). Virtual machines often give only a
    vendor line: "AMD EPYC" named two CPU generations here, on which ResNet-56 ran in 1.73 and
    1.09 ms, so the name alone let a table measured on one predict for the other."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""  # no /proc (not Linux): fall back to what platform knows
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip() and fields:
            break  # the end of the first processor's block
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    for keys in (_X86_ID, _ARM_ID):
        if all(k in fields for k in keys):
            return f"{name} ({', '.join(f'{k} {fields[k]}' for k in keys)})"
    return name


def availability(device: TargetDevice) -> tuple[bool, str]:
    """(usable here, why not). Never opens a network connection: remote devices are reported
    as needing their RPC server, and checked when first measured."""
    if device.remote is not None:
        r = device.remote
        return False, (f"remote: needs the TVM RPC {'tracker' if r.tracker else 'server'} at "
                       f"{r.host}:{r.port}")
    if device.runtime == "onnxruntime":
        try:
            import onnxruntime as ort
        except ImportError:
            return False, "onnxruntime is not installed (`pip install onnxruntime`)"
        if device.provider not in ort.get_available_providers():
            return False, (f"{device.provider} is not available in this onnxruntime build "
                           f"(has {', '.join(ort.get_available_providers())})")
        return True, ""
    try:
        import tvm
    except ImportError:
        return False, "TVM is not installed (`pip install apache-tvm`)"
    kind = device.target.get("kind")
    dev = tvm.cuda(0) if kind == "cuda" else tvm.cpu(0)
    if kind == "cuda" and not dev.exist:
        return False, "no CUDA GPU on this machine"
    if kind == "llvm" and "mtriple" in device.target and \
            not device.target["mtriple"].startswith(platform.machine()):
        return False, f"cross target {device.target['mtriple']}: measure it over RPC"
    return True, ""
