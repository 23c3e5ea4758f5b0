"""Model zoo, user models from ``file.py:factory``, and autoprune checkpoints.

A checkpoint written by autoprune is a plain dict of tensors and JSON-like metadata (model spec,
data spec, input shape, accuracy), loaded with ``torch.load(weights_only=True)`` so no pickled
code ever runs; ``--weights ckpt.pt`` alone is enough to rebuild the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import atomic_write
from ..errors import UserError, first_line
from .zoo import ZOO

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "autoprune-checkpoint-v1"


@dataclass(frozen=True)
class ModelSpec:
    """What to build: a zoo name or ``path/to/file.py:factory``, plus the input it adapts to."""

    name: str
    num_classes: int = 10
    in_channels: int = 3
    input_size: int = 32
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.name:
            raise UserError("`--model` is empty; give a zoo name "
                            f"({', '.join(ZOO)}) or path/to/file.py:factory")
        for key in ("num_classes", "in_channels", "input_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"model `{key}` must be a positive integer, got {value!r}")

    @property
    def is_user_model(self) -> bool:
        return self.name not in ZOO

    @property
    def family(self) -> str:
        """The search-space family (``search_spaces/<family>.yaml``)."""
        return ZOO[self.name][1] if self.name in ZOO else "default"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return cls(**d)


def _split_user_spec(name: str) -> tuple[Path, str]:
    path, sep, factory = name.rpartition(":")
    if not sep or not path.endswith(".py") or not factory:
        raise UserError(f"unknown model {name!r}; choose one of the zoo ({', '.join(ZOO)}) "
                        "or give path/to/file.py:factory")
    return Path(path), factory


def _load_user_factory(name: str):
    path, factory = _split_user_spec(name)
    if not path.is_file():
        raise UserError(f"model file {str(path)!r} not found; check the path in `--model "
                        f"{name}`")
    mod_name = "autoprune_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's file: any error there is theirs to fix
        raise UserError(f"importing model file {str(path)!r} failed with "
                        f"{type(e).__name__}: {e}; fix the file") from e
    fn = getattr(module, factory, None)
    if not callable(fn):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise UserError(f"factory {factory!r} not found in {str(path)!r} (callables there: "
                        f"{', '.join(found) or 'none'}); name it in `--model {path}:NAME`")
    return fn


def build_model(spec: ModelSpec) -> nn.Module:
    """Build an untrained model from its spec (a zoo name or a user factory)."""
    if spec.name in ZOO:
        factory = ZOO[spec.name][0]
        return factory(spec.num_classes, spec.in_channels, input_size=spec.input_size,
                       **spec.options)
    factory = _load_user_factory(spec.name)
    try:
        model = factory(spec.num_classes, spec.in_channels, **spec.options)
    except Exception as e:
        raise UserError(f"model factory {spec.name!r} raised {type(e).__name__}: {e}; it must "
                        "accept (num_classes, in_channels) and return an nn.Module") from e
    if not isinstance(model, nn.Module):
        raise UserError(f"model factory {spec.name!r} returned {type(model).__name__}, not an "
                        "nn.Module; return the model")
    return model


def save_checkpoint(path: str | Path, model: nn.Module, *, model_spec: ModelSpec,
                    data_spec: str | None, input_shape: tuple[int, ...],
                    metrics: dict[str, float] | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s weights with everything needed to rebuild it, atomically."""
    from .. import __version__

    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "autoprune_version": __version__,
        "model": model_spec.to_dict(),
        "data": data_spec,
        "input_shape": list(input_shape),
        "metrics": dict(metrics or {}),
        "extra": dict(extra or {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    return atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint (ours or a bare state dict) safely; never runs pickled code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} not found; check `--weights`")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {str(path)!r} is unreadable ({first_line(e)}); give a file "
                        "written by `autoprune train` or torch.save(model.state_dict())") from e
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"format": None, "model": None, "data": None, "input_shape": None,
                "metrics": {}, "extra": {}, "state_dict": obj}
    raise UserError(f"checkpoint {str(path)!r} holds neither an autoprune checkpoint nor a "
                    "state dict; save one with torch.save(model.state_dict(), PATH)")


def load_state(model: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Load ``state`` strictly; a mismatch names the layers that differ."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatch: " + "; ".join(shapes[:3])
                         + (f" (+{len(shapes) - 3} more)" if len(shapes) > 3 else ""))
        if missing:
            parts.append("missing: " + ", ".join(missing[:3])
                         + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""))
        if unexpected:
            parts.append("unexpected: " + ", ".join(unexpected[:3])
                         + (f" (+{len(unexpected) - 3} more)" if len(unexpected) > 3 else ""))
        raise UserError(f"checkpoint {source!r} does not fit this architecture ("
                        + " | ".join(parts) + "); pass the `--model` it was trained with")
    model.load_state_dict(state)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
