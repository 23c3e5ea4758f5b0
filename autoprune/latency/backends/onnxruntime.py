"""onnxruntime backend: export to ONNX, one session with the device's threads and provider,
all graph optimisations on (BN folded, conv+add+relu fused), timed until the median is stable."""

from __future__ import annotations

import itertools
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...export import ONNX_OPSET
from ..stats import time_callable
from . import Backend


def export_module(module: nn.Module, inputs: tuple[torch.Tensor, ...], path: str | Path) -> None:
    names = [f"input{i}" if i else "input" for i in range(len(inputs))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), inputs, str(path), dynamo=False, input_names=names,
                          output_names=["output"], opset_version=ONNX_OPSET)


class OrtBackend(Backend):
    def __init__(self, device, *, max_seconds: float = 3.0):
        super().__init__(device)
        import onnxruntime

        self._ort = onnxruntime
        self.max_seconds = max_seconds
        self._names = itertools.count()  # one scratch file name per export

    def session(self, path: str | Path, *, profile: bool = False):
        ort = self._ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.device.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if profile:
            opts.enable_profiling = True
            opts.profile_file_prefix = str(Path(self._tmp.name) / "profile")
        return ort.InferenceSession(str(path), sess_options=opts,
                                    providers=[self.device.provider])

    def _feeds(self, session, inputs):
        return {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs, strict=True)}

    def _prepare_module(self, module, inputs):
        path = Path(self._tmp.name) / f"m{next(self._names)}.onnx"
        export_module(module, inputs, path)
        session = self.session(path)
        path.unlink()  # the session holds the graph; the scratch folder does not grow
        feeds = self._feeds(session, inputs)
        return lambda: time_callable(lambda: session.run(None, feeds),
                                     max_seconds=self.max_seconds)

    def per_op(self, model, input_shape) -> dict[str, float]:
        """Per-node median ms from onnxruntime's profiler (after fusion: names are the
        optimised graph's nodes)."""
        path = Path(self._tmp.name) / "p.onnx"
        x = torch.randn(self.device.batch, *input_shape[1:])
        export_module(model, (x,), path)
        session = self.session(path, profile=True)
        feeds = self._feeds(session, (x,))
        for _ in range(30):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
        per_node: dict[str, list[float]] = {}
        for ev in events:
            if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
                per_node.setdefault(ev["name"][: -len("_kernel_time")], []).append(
                    ev["dur"] / 1e3)
        return {k: float(np.median(v)) for k, v in per_node.items()}

    @classmethod
    def static_versions(cls, device) -> dict[str, str]:
        import onnxruntime

        return {"onnxruntime": onnxruntime.__version__, "provider": device.provider,
                "torch": torch.__version__}
