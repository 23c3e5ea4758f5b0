"""Measurement backends: one per runtime, imported lazily (onnxruntime, TVM)."""

from __future__ import annotations

import abc
import hashlib
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ...errors import UserError
from ..devices import TargetDevice, availability
from ..ops import OpModule, OpSig
from ..stats import LatencyStat


class Backend(abc.ABC):
    """Measures latency on one target device.

    Call order: ``Backend(device)``, then optionally ``prepare_ops(sigs)`` before measuring
    many ops, then any number of ``measure_model`` / ``measure_op`` / ``per_op`` calls, or
    ``prepare_model`` / ``prepare_op`` calls and calls of the timers they return, then
    ``close()`` (also done by using the backend as a context manager). A runtime implements
    ``_prepare_module`` (and ``per_op``, ``static_versions``); the rest follows from it.
    """

    def __init__(self, device: TargetDevice):
        usable, why = availability(device)
        if not usable and device.remote is None:
            raise UserError(f"target device {device.name!r} is not usable here: {why}")
        self.device = device
        # scratch space for exported/compiled files; removed by close()
        self._tmp = tempfile.TemporaryDirectory(prefix=f"autoprune-{device.runtime}-")

    def measure_model(self, model: nn.Module, input_shape: tuple[int, ...]) -> LatencyStat:
        """Latency of one forward pass of the whole model (batch = the device's)."""
        return self.prepare_model(model, input_shape)()

    def prepare_model(self, model: nn.Module,
                      input_shape: tuple[int, ...]) -> Callable[[], LatencyStat]:
        """A timer for ``model``: each call measures it once more, as ``measure_model`` does.
        The export or compile is done once, here, so many passes over many models pay only
        for their timing."""
        return self._prepare_module(model, (torch.randn(self.device.batch, *input_shape[1:]),))

    def prepare_ops(self, sigs: list[OpSig], *, progress: bool = False) -> None:
        """Get ready to measure many ops (a tuned TVM device tunes them all in one run)."""
        del sigs, progress  # most runtimes need no preparation

    def measure_op(self, sig: OpSig) -> LatencyStat:
        """Latency of one op (layer + fused post-ops) in isolation."""
        return self.prepare_op(sig)()

    def prepare_op(self, sig: OpSig) -> Callable[[], LatencyStat]:
        """A timer for one op, as `prepare_model` is for a whole model."""
        module = OpModule(sig)
        return self._prepare_module(module, module.example_inputs(self.device.batch))

    @abc.abstractmethod
    def _prepare_module(self, module: nn.Module,
                        inputs: tuple[torch.Tensor, ...]) -> Callable[[], LatencyStat]:
        """Export or compile ``module`` for ``inputs`` once; the returned callable times it
        (warm-up, then repeats) and may be called any number of times."""

    @abc.abstractmethod
    def per_op(self, model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, float]:
        """A breakdown of one forward pass: runtime node/kernel name -> ms."""

    @classmethod
    @abc.abstractmethod
    def static_versions(cls, device: TargetDevice) -> dict[str, str]:
        """Runtime and library versions that a latency table for ``device`` depends on
        (a classmethod: checking a table needs no backend, nor an RPC session)."""

    def versions(self) -> dict[str, str]:
        return type(self).static_versions(self.device)

    def close(self) -> None:
        self._tmp.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _onnxruntime() -> type[Backend]:
    from .onnxruntime import OrtBackend

    return OrtBackend


def _tvm() -> type[Backend]:
    try:
        from .tvm import TvmBackend
    except ImportError as e:
        raise UserError(f"TVM is not importable ({e}); `pip install apache-tvm`") from e
    return TvmBackend


# runtime name -> loader of the backend class (lazy: each runtime is imported where used)
BACKENDS: dict[str, Callable[[], type[Backend]]] = {"onnxruntime": _onnxruntime, "tvm": _tvm}


def get_backend(device: TargetDevice, **options) -> Backend:
    return BACKENDS[device.runtime]()(device, **options)


def structure_hash(module: nn.Module, inputs: tuple[torch.Tensor, ...], *extra: str) -> str:
    """A hash of what determines a compiled artefact's speed: layer types and parameter shapes
    (not values), input shapes, plus ``extra`` (target, versions)."""
    h = hashlib.sha256()
    for name, m in module.named_modules():
        h.update(f"{name}:{type(m).__name__}:{m.extra_repr()}".encode())
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)}".encode())
    for x in inputs:
        h.update(str(tuple(x.shape)).encode())
    for e in extra:
        h.update(e.encode())
    return h.hexdigest()[:24]


def cache_dir() -> Path:
    import os

    root = Path(os.environ.get("AUTOPRUNE_CACHE", Path.home() / ".cache" / "autoprune"))
    root.mkdir(parents=True, exist_ok=True)
    return root
