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


def check_onnx(path: str | Path, model: nn.Module, inputs: torch.Tensor) -> float:
    """Max abs difference between onnxruntime and PyTorch on ``inputs``."""
    session = onnxruntime_session(path)
    got = session.run(None, {"input": inputs.numpy()})[0]
    with torch.no_grad():
        want = model.eval()(inputs).numpy()
    return float(np.abs(got - want).max())
