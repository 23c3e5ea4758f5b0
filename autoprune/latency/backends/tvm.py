"""TVM (Relax) backend: torch.export -> Relax -> build for the device's target -> VM, locally or
over RPC, timed with ``time_evaluator``.

Compiled modules are cached on disk, keyed by (model structure, input shapes, target, TVM
version, tuned or not). A tuned device (``tuning:`` in devices.yaml) first MetaSchedule-tunes
every task of the module that its database lacks, with a trial budget per task; the database
lives in ``latency_tables/<device>/tuning/`` beside the device's tables and is applied to the
raw module (the ``static_shape_tuning`` pipeline's passes, with 0 further trials). Tasks
already tuned are never re-tuned, so a cached module stays valid. Only tasks with a conv or
matmul are tuned: a whole model also yields its pooling ``mean`` and a ``reshape`` per width,
each worth microseconds and each costing ~2 min of tuning here, so they keep TVM's default
schedule. The database (28 MB for ResNet-20's tasks, ~9 s to parse) is read once per backend,
not once per compile.

Known here (TVM 0.27): the default MetaSchedule builder's worker import takes ~34 s, beyond its
30 s timeout, so the builder gets a longer one; apache-tvm-ffi 0.1.15.post2 segfaults in
``tvm.ir.save_json`` (the database writer), so 0.1.14.post1 is pinned.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..._io import atomic_write
from ...errors import UserError
from ..devices import LATENCY_TABLES_DIR
from ..stats import LatencyStat
from . import Backend, cache_dir, structure_hash

log = logging.getLogger(__name__)

BUILDER_TIMEOUT_S = 300  # the default 30 s is shorter than the builder worker's import here
TUNED_OPS = ("conv2d", "matmul", "dense")  # a task is tuned when its name contains one of these


class TvmBackend(Backend):
    def __init__(self, device, *, tuning_dir: str | Path | None = None,
                 trials_per_task: int | None = None, repeat: int = 30,
                 min_repeat_ms: int = 10, rpc_timeout_s: int = 600, connect: bool = True):
        """``connect=False`` (a remote device only): compile for it without an RPC session,
        e.g. to export a cross-compiled library while the board is unreachable."""
        super().__init__(device)
        # TVM's thread pool pins the thread that runs a module to CPU 0 as it starts (unless
        # TVM_BIND_THREADS says not to), and the pin outlived the run: everything the process
        # did next ran on one core, torch's evaluation threads included (they inherit it),
        # and so did the measurements of `export`, which builds its TVM library first. A
        # value the user set is kept.
        os.environ.setdefault("TVM_BIND_THREADS", "0")
        import tvm

        self._tvm = tvm
        self.target = device.tvm_target()
        self.repeat, self.min_repeat_ms = repeat, min_repeat_ms
        self.tuned = device.tuned
        self._db = None  # the tuning database, loaded on first use
        self.trials_per_task = trials_per_task or int(device.tuning.get("trials_per_task", 32))
        self.tuning_dir = Path(tuning_dir) if tuning_dir else \
            LATENCY_TABLES_DIR / device.name / "tuning"
        self._remote = None
        if device.remote is not None:
            self.dev = None
            if connect:
                self._remote = self._connect(rpc_timeout_s)
                self.dev = self._remote.cpu() if device.target.get("kind") != "cuda" \
                    else self._remote.cuda()
        else:
            self.dev = tvm.cuda(0) if device.target.get("kind") == "cuda" else tvm.cpu(0)
            config = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
            if config is not None:  # pin the runtime's worker threads to the device's count
                config(0, device.threads)

    # ------------------------------------------------------------------ RPC
    def _connect(self, timeout_s: int):
        from tvm import rpc

        r = self.device.remote
        try:
            if r.tracker:
                return rpc.connect_tracker(r.host, r.port).request(
                    r.key, session_timeout=timeout_s)
            return rpc.connect(r.host, r.port, key=r.key or "", session_timeout=timeout_s)
        except Exception as e:
            what = "tracker" if r.tracker else "server"
            raise UserError(f"cannot reach the TVM RPC {what} of device {self.device.name!r} at "
                            f"{r.host}:{r.port} ({e}); start it on the board (see README, "
                            "'Remote devices') or fix `remote:` in the devices file") from e

    # ------------------------------------------------------------------ compile
    def _relax_module(self, module, inputs):
        from tvm.relax.frontend.torch import from_exported_program

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.no_grad():
                program = torch.export.export(module.eval(), tuple(inputs))
            return from_exported_program(program, keep_params_as_input=False)

    def _lower_for_tuning(self, mod):
        from tvm import relax
        from tvm.relax import transform

        with self.target:
            return self._tvm.transform.Sequential([
                transform.DecomposeOpsForInference(), transform.CanonicalizeBindings(),
                relax.get_pipeline("zero")])(mod)

    def _database(self):
        """The device's tuning database, read once per backend."""
        if self._db is None:
            import tvm.s_tir.meta_schedule as ms

            self.tuning_dir.mkdir(parents=True, exist_ok=True)
            self._db = ms.database.JSONDatabase(work_dir=str(self.tuning_dir))
        return self._db

    def _tune_missing(self, lowered) -> None:
        """MetaSchedule-tune, in one run, the conv/matmul tasks of the ``lowered`` modules that
        the device's database lacks (one run: the builder's worker start-up is paid once)."""
        import tvm.s_tir.meta_schedule as ms
        import tvm_ffi  # structural_hash lives here in TVM 0.27

        db = self._database()
        missing, seen = [], set()
        for mod in lowered:
            for t in ms.relax_integration.extract_tasks(mod, self.target):
                if not any(op in t.task_name for op in TUNED_OPS):
                    continue
                h = tvm_ffi.structural_hash(t.dispatched[0])
                if h in seen:
                    continue
                seen.add(h)
                if db.query_tuning_record(t.dispatched[0], self.target, t.task_name) is None:
                    missing.append(t)
        if not missing:
            return
        log.info("tuning %d task(s) x %d trials for %s", len(missing), self.trials_per_task,
                 self.device.name)
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            missing, str(self.tuning_dir / "logs"), seed=0)
        if not contexts:  # every missing task was already scheduled by hand: nothing to tune
            return
        ms.tune.tune_tasks(
            tasks=contexts, task_weights=[float(w) for w in weights],
            work_dir=str(self.tuning_dir / "logs"),
            max_trials_global=self.trials_per_task * len(contexts),
            max_trials_per_task=self.trials_per_task,
            num_trials_per_iter=min(16, self.trials_per_task), database=db,
            builder=ms.builder.LocalBuilder(max_workers=os.cpu_count() or 1,
                                            timeout_sec=BUILDER_TIMEOUT_S),
            runner=ms.runner.LocalRunner(), task_scheduler="round-robin")

    def prepare_ops(self, sigs) -> None:
        if not self.tuned:
            return
        from ..ops import OpModule

        mods = []
        for sig in sigs:
            module = OpModule(sig)
            mods.append(self._lower_for_tuning(
                self._relax_module(module, module.example_inputs(self.device.batch))))
        self._tune_missing(mods)

    def compile(self, module, inputs, *, weights: bool = False) -> Path:
        """Build ``module`` for the target; return the path of the shared library (cached).

        ``weights=True`` makes the weights part of the cache key (for export: the library
        embeds them as constants); measurement only needs the structure."""
        from tvm import relax

        tvm = self._tvm
        extra = [json.dumps(self.device.target, sort_keys=True), tvm.__version__,
                 f"tuned:{self.tuning_dir.resolve()}" if self.tuned else "untuned",
                 self.device.cross_compiler or ""]
        if weights:
            import hashlib

            h = hashlib.sha256()
            for t in module.state_dict().values():
                h.update(t.detach().cpu().numpy().tobytes())
            extra.append(h.hexdigest())
        path = cache_dir() / "tvm" / f"{structure_hash(module, inputs, *extra)}.so"
        if path.is_file():
            return path
        mod = self._relax_module(module, inputs)
        if self.tuned:
            mod = self._lower_for_tuning(mod)
            self._tune_missing([mod])
            # what static_shape_tuning_pipeline(total_trials=0) does after lowering, with the
            # database already in memory instead of re-read from its work_dir
            with self.target, self._database():
                mod = relax.transform.MetaScheduleApplyDatabase()(mod)
        executable = relax.build(mod, target=self.target)
        fcompile = None
        if self.device.cross_compiler:
            from tvm.contrib import cc

            fcompile = cc.cross_compiler(self.device.cross_compiler)

        def write(tmp: str) -> None:
            # export_library picks the output format from the suffix: write .so, then rename.
            executable.export_library(tmp + ".so", fcompile=fcompile)
            os.replace(tmp + ".so", tmp)

        atomic_write(path, write)
        return path

    def load(self, lib_path: Path):
        """A Relax VM for a compiled library, on this machine or on the remote device."""
        from tvm import relax

        if self._remote is not None:
            name = f"{lib_path.stem}-{int(time.time() * 1e3)}.so"
            self._remote.upload(str(lib_path), target=name)
            lib = self._remote.load_module(name)
        else:
            lib = self._tvm.runtime.load_module(str(lib_path))
        return relax.VirtualMachine(lib, self.dev)

    def run(self, vm, inputs) -> list[np.ndarray]:
        """Outputs of one call (works over RPC, where results come back via get_outputs)."""
        args = [self._tvm.runtime.tensor(x.numpy(), self.dev) for x in inputs]
        vm.set_input("main", *args)
        vm.invoke_stateful("main")
        out = vm.get_outputs("main")
        out = out if isinstance(out, (tuple, list)) else [out]
        return [o.numpy() for o in out]

    # ------------------------------------------------------------------ measure
    def _prepare_module(self, module, inputs):
        """Compile (or take from the cache) and load ``module`` once; the returned callable
        warms it up and times it."""
        vm = self.load(self.compile(module, inputs))
        args = [self._tvm.runtime.tensor(x.numpy(), self.dev) for x in inputs]
        timer = vm.time_evaluator("main", self.dev, number=1, repeat=self.repeat,
                                  min_repeat_ms=self.min_repeat_ms)
        warm = vm.time_evaluator("main", self.dev, number=1, repeat=3)

        def measure() -> LatencyStat:
            warm(*args)
            return LatencyStat.from_samples([r * 1e3 for r in timer(*args).results])

        return measure

    def per_op(self, model, input_shape) -> dict[str, float]:
        """Per-kernel median ms via the VM's instrumentation hook (the VM profiler is gone in
        TVM 0.27): wall time between the before- and after-call events of each kernel."""
        x = torch.randn(self.device.batch, *input_shape[1:])
        vm = self.load(self.compile(model, (x,)))
        times: dict[str, list[float]] = {}
        starts: dict[str, float] = {}

        def instrument(func, name, before_run, ret_value, *args):
            if before_run:
                starts[name] = time.perf_counter()
            else:
                times.setdefault(name, []).append((time.perf_counter() - starts[name]) * 1e3)
            return 0  # VMInstrumentReturnKind.NO_OP: carry on

        vm.set_instrument(instrument)
        for _ in range(10):
            self.run(vm, (x,))
        return {k: float(np.median(v)) for k, v in times.items()
                if not k.startswith("vm.builtin")}

    @classmethod
    def static_versions(cls, device) -> dict[str, str]:
        import tvm
        import tvm_ffi

        return {"tvm": tvm.__version__, "tvm_ffi": getattr(tvm_ffi, "__version__", "?"),
                "target": json.dumps(device.target, sort_keys=True),
                "tuned": str(device.tuned), "torch": torch.__version__}
