"""Export of (pruned) models, each verified numerically against PyTorch.

ONNX goes through torch's TorchScript exporter (``dynamo=False``): the dynamo exporter needs
onnxscript, and this path is the one onnxruntime and TVM's ONNX frontend both read well.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._io import atomic_write
from .errors import UserError

log = logging.getLogger(__name__)

ONNX_OPSET = 17


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | Path, *,
                dynamic_batch: bool = True) -> Path:
    """Write ``model`` as ONNX (input ``input``, output ``logits``), atomically."""
    model = model.eval()
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None

    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example_input,), tmp, dynamo=False, input_names=["input"],
                              output_names=["logits"], dynamic_axes=axes,
                              opset_version=ONNX_OPSET)

    return atomic_write(path, write)


def onnxruntime_session(path: str | Path, *, threads: int = 1,
                        providers: tuple[str, ...] = ("CPUExecutionProvider",)):
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - onnxruntime is a core dependency
        raise UserError("onnxruntime is not installed; `pip install onnxruntime`") from e
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))


def check_onnx(path: str | Path, model: nn.Module, inputs: torch.Tensor, *,
               batch: int | None = None) -> float:
    """Max abs difference between onnxruntime and PyTorch on ``inputs`` (in chunks of
    ``batch`` for a model exported with a fixed batch size)."""
    session = onnxruntime_session(path)
    return max_abs_diff(lambda x: session.run(None, {"input": x.numpy()})[0], model, inputs,
                        batch=batch or len(inputs))


def max_abs_diff(run, model: nn.Module, inputs: torch.Tensor, *, batch: int) -> float:
    """Max abs difference between ``run(x) -> ndarray`` and ``model(x)`` over ``inputs``, fed
    in batches of ``batch`` (an exported model may have a fixed batch size)."""
    worst = 0.0
    model = model.eval()
    with torch.no_grad():
        for i in range(0, len(inputs) - batch + 1, batch):
            x = inputs[i:i + batch]
            worst = max(worst, float(np.abs(run(x) - model(x).numpy()).max()))
    return worst


# ---------------------------------------------------------------------------- TVM
def tvm_export_device(device):
    """The device a TVM library is compiled for: the study's own TVM device, or, for an
    onnxruntime device, this host's llvm target with the device's threads (untuned)."""
    from dataclasses import replace

    if device.runtime == "tvm":
        return device
    if device.is_cuda:
        return replace(device, name=f"{device.name}:tvm", runtime="tvm", provider=None,
                       target={"kind": "cuda"}, tuning={})
    return replace(device, name=f"{device.name}:tvm", runtime="tvm", provider=None,
                   target={"kind": "llvm", "num-cores": device.threads}, tuning={})


def export_tvm(model: nn.Module, example_input: torch.Tensor, path: str | Path, device, *,
               tuning_dir: str | Path | None = None, check_inputs: torch.Tensor | None = None
               ) -> dict:
    """Compile ``model`` (weights embedded) for ``device``'s target with ``export_library``
    and, where the device can run it (here, or over RPC when reachable), reload the library
    and compare it with PyTorch on ``check_inputs`` (batch by batch of the device's size).

    Returns ``{"path", "target", "max_abs_diff"}``; ``max_abs_diff`` is None, with ``unchecked``
    saying why, when the remote device cannot be reached (the library is still written)."""
    import shutil

    from .latency.backends.tvm import TvmBackend

    out: dict = {"path": str(path), "target": device.target}
    try:
        backend = TvmBackend(device, tuning_dir=tuning_dir)
    except UserError as e:
        if device.remote is None:
            raise
        backend = TvmBackend(device, tuning_dir=tuning_dir, connect=False)
        out["unchecked"] = str(e)
    with backend:
        lib = backend.compile(model.eval(), (example_input,), weights=True)
        atomic_write(path, lambda tmp: shutil.copyfile(lib, tmp))
        out["max_abs_diff"] = None
        if "unchecked" not in out and check_inputs is not None:
            vm = backend.load(Path(path))
            out["max_abs_diff"] = max_abs_diff(lambda x: backend.run(vm, (x,))[0], model,
                                               check_inputs, batch=example_input.shape[0])
    return out


# ---------------------------------------------------------------------------- torch
def export_torch_program(model: nn.Module, example_input: torch.Tensor, path: str | Path, *,
                         dynamic_batch: bool = True) -> Path:
    """A ``torch.export`` program (``.pt2``): loads with ``torch.export.load`` and runs
    without autoprune or the model's source code."""
    model = model.eval()
    shapes = None
    x = example_input
    if dynamic_batch:
        # a batch of 1 would be specialised as a constant: trace with 2
        x = example_input[:1].expand(2, *example_input.shape[1:]).contiguous()
        shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (x,), dynamic_shapes=shapes)
    return atomic_write(path, lambda tmp: torch.export.save(program, tmp))


def check_torch_program(path: str | Path, model: nn.Module, inputs: torch.Tensor) -> float:
    """Max abs difference between the saved ``torch.export`` program and ``model``."""
    program = torch.export.load(str(path)).module()
    return max_abs_diff(lambda x: program(x).numpy(), model, inputs, batch=len(inputs))
