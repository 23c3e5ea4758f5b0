"""TVM (Relax) backend: torch.export -> Relax -> build for the device's target -> VM, locally or
over RPC, timed with ``time_evaluator``.

Compiled modules are cached on disk, keyed by (model structure, input shapes, target, TVM
version, tuned or not). A tuned device (``tuning:`` in devices.yaml) first MetaSchedule-tunes
every task of the module that its database lacks, with a trial budget per task; the database
lives in ``latency_tables/<device>/tuning/`` beside the device's tables and is applied to the
raw module (the ``static_shape_tuning`` pipeline's passes, with 0 further trials). On a tuned
device the key also holds the schedule each task takes from the database: a library is reused
wherever the database gives the same kernels (a database moved or copied, too), and never once
one of them has changed. Finding them costs the model's lowering, not its build (ResNet-56
here: 12 s against 25 to 30 s for a whole compile); while the databases' files stay unchanged,
a pointer keyed by their sizes and times finds the library without it. Only tasks with a conv
or matmul are tuned: a whole model also yields its pooling ``mean`` and a
``reshape`` per width, each worth microseconds and each costing ~2 min of tuning here, so they
keep TVM's default schedule. The database (28 MB for ResNet-20's tasks, ~9 s to parse) is read
once per backend, not once per compile.

Transfer tuning (``tuning: {transfer: true}``): tuning a shape costs about a minute here, and a
pruned model is made of shapes never tuned. A task the database lacks then takes the schedule
of a tuned workload of the same computation at other shapes: its trace, replayed on the new
workload up to its postprocessing (TVM keeps a tile decision that still divides the new extent
and makes the rest trivial), then the target's postprocessors run on the result. The nearest
workloads by buffer shapes are tried in turn; of the first
``transfer_candidates`` that apply and build, the quickest (timed once here) is kept, in a
second database under ``tuning/transfer/`` so that a table and the whole models measured
against it run the same kernels. Only a task that no tuned schedule fits is tuned. ``profile``
tunes the widest op of each family first (the model's own widths), so the rest have sources.

Known here (TVM 0.27): the default MetaSchedule builder's worker import takes ~34 s, beyond its
30 s timeout, so the builder gets a longer one; apache-tvm-ffi 0.1.15.post2 segfaults in
``tvm.ir.save_json`` (the database writer), so 0.1.14.post1 is pinned.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
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
        self._transfer_db = None  # the transferred schedules (``transfer``), likewise
        self._source_list = None  # the tuned schedules a transfer may borrow
        self.transfers = 0  # schedules transferred by this backend
        self.trials_per_task = trials_per_task or int(device.tuning.get("trials_per_task", 32))
        self.transfer = self.tuned and bool(device.tuning.get("transfer", False))
        self.transfer_candidates = int(device.tuning.get("transfer_candidates", 3))
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

    def _transfer_database(self):
        """The schedules transferred to shapes that were never tuned (``tuning_dir/transfer``):
        kept apart from the tuned ones, which alone serve as sources."""
        if self._transfer_db is None:
            import tvm.s_tir.meta_schedule as ms

            where = self.tuning_dir / "transfer"
            where.mkdir(parents=True, exist_ok=True)
            self._transfer_db = ms.database.JSONDatabase(work_dir=str(where))
        return self._transfer_db

    def _applied_database(self):
        """What a compile applies: the tuned schedules, then (``transfer``) the transferred."""
        if not self.transfer:
            return self._database()
        import tvm.s_tir.meta_schedule as ms

        return ms.database.OrderedUnionDatabase(self._database(), self._transfer_database())

    def _record(self, task) -> tuple[str, object] | None:
        """``task``'s schedule as a compile applies it (`_applied_database`): ``("tuned",
        record)`` or ``("transferred", record)``; None: neither database holds one, so TVM's
        default schedule."""
        mod = task.dispatched[0]
        for source, db in (("tuned", self._database()),
                           *((("transferred", self._transfer_database()),)
                             if self.transfer else ())):
            rec = db.query_tuning_record(mod, self.target, task.task_name)
            if rec is not None:
                return source, rec
        return None

    def _record_source(self, task) -> str | None:
        """``tuned`` or ``transferred``: the database that holds ``task``'s schedule (None:
        neither, so TVM's default schedule)."""
        found = self._record(task)
        return None if found is None else found[0]

    def _tuned_tasks(self, mod) -> list:
        """The tasks of a lowered module that a tuned device schedules (conv and matmul)."""
        import tvm.s_tir.meta_schedule as ms

        return [t for t in ms.relax_integration.extract_tasks(mod, self.target)
                if any(op in t.task_name for op in TUNED_OPS)]

    def _lowered_op(self, sig):
        """Op ``sig`` alone, lowered as a whole model is before its tasks are extracted."""
        from ..ops import OpModule

        module = OpModule(sig)
        return self._lower_for_tuning(
            self._relax_module(module, module.example_inputs(self.device.batch)))

    # ------------------------------------------------------------------ transfer tuning
    def _sources(self) -> list:
        """The best tuned schedule of every workload in the database, with its buffer shapes:
        what a shape never tuned may borrow. Built once per backend, again after a tuning run."""
        if self._source_list is None:
            import tvm_ffi

            best: dict[int, tuple[float, object]] = {}
            for r in self._database().get_all_tuning_records():
                secs = [float(x) for x in (r.run_secs or [])]
                if not secs or max(secs) >= 1e9:  # never ran, or failed (MetaSchedule's 1e10)
                    continue
                h = int(tvm_ffi.structural_hash(r.workload.mod))
                t = float(np.median(secs))
                if h not in best or t < best[h][0]:
                    best[h] = (t, r)
            self._source_list = [(_arg_shapes(r.workload.mod), r.trace)
                                 for _, r in best.values()]
        return self._source_list

    def _transfer(self, task) -> bool:
        """Give ``task`` the schedule of a tuned workload of the same computation at other
        shapes: the nearest (by buffer shapes) up to ``transfer_candidates`` whose trace
        applies and builds, each timed once here (a remote device takes the nearest), the
        quickest kept in the transfer database. False when none applies."""
        import tvm.s_tir.meta_schedule as ms
        from tvm.s_tir.schedule import Schedule

        tvm = self._tvm
        mod = task.dispatched[0]
        shapes = _arg_shapes(mod)
        near = sorted((d, k) for k, (src, _) in enumerate(self._sources())
                      if (d := _shape_distance(shapes, src)) < math.inf)
        if not near:
            return False
        # the trace is replayed up to its postprocessing, which is redone for the new shapes:
        # replayed too, it fetched loop nests that the new tiles had changed (a unit loop gone)
        postprocs = ms.TuneContext(mod=mod, target=self.target, space_generator="post-order-apply",
                                   search_strategy="replay-trace",
                                   task_name=task.task_name).space_generator.postprocs
        fits = []
        for _, k in near:
            sch = Schedule(mod)
            try:
                self._sources()[k][1].apply_to_schedule(sch, remove_postproc=True)
                if not all(p.apply(sch) for p in postprocs):
                    continue
                lib = tvm.compile(sch.mod, target=self.target)
            except Exception:  # another computation, or tiles that no longer build: next one
                continue
            fits.append((sch, lib))
            if len(fits) >= self.transfer_candidates:
                break
        if not fits:
            return False
        secs = [1.0] * len(fits)
        if self._remote is None and len(fits) > 1:
            rng = np.random.default_rng(0)
            args = [tvm.runtime.tensor(rng.uniform(size=s).astype("float32"), self.dev)
                    for s in shapes]
            for k, (_, lib) in enumerate(fits):
                timer = lib.mod.time_evaluator("main", self.dev, number=1, repeat=10,
                                               min_repeat_ms=self.min_repeat_ms)
                timer(*args)  # warm-up
                secs[k] = float(np.median(timer(*args).results))
        k = int(np.argmin(secs))
        db = self._transfer_database()
        db.commit_tuning_record(ms.database.TuningRecord(
            fits[k][0].trace, db.commit_workload(mod), [secs[k]], self.target,
            ms.arg_info.ArgInfo.from_entry_func(mod)))
        self.transfers += 1
        return True

    def _tune_missing(self, lowered, *, transfer: bool = True, progress: bool = False) -> None:
        """Schedule the conv/matmul tasks of the ``lowered`` modules that the device's database
        lacks: with ``transfer`` on (the device's and this call's), each takes a tuned schedule
        of another shape where one applies; the rest are MetaSchedule-tuned, in one run (the
        builder's worker start-up is paid once)."""
        import tvm.s_tir.meta_schedule as ms
        import tvm_ffi  # structural_hash lives here in TVM 0.27

        missing, seen = [], set()
        for mod in lowered:
            for t in self._tuned_tasks(mod):
                h = tvm_ffi.structural_hash(t.dispatched[0])
                if h in seen:
                    continue
                seen.add(h)
                if self._record_source(t) is None:
                    missing.append(t)
        if self.transfer and transfer and missing:
            from ...progress import bar

            left = []
            with bar(f"transfer schedules ({self.device.name})", len(missing),
                     enabled=progress) as pbar:
                for t in missing:
                    if not self._transfer(t):
                        left.append(t)
                    pbar.advance()
            missing = left
        if not missing:
            return
        log.info("tuning %d task(s) x %d trials for %s (its log: %s)", len(missing),
                 self.trials_per_task, self.device.name, self.tuning_dir / "logs")
        # MetaSchedule logs every trial to stdout, where `--json` output goes: its console
        # handler (made inside these calls, at the level its logger has then) gets stderr
        # and warnings only; its files under tuning/logs keep everything
        logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
        with contextlib.redirect_stdout(sys.stderr):
            self._run_tuning(ms, missing)
        self._source_list = None  # new sources to transfer from

    def _run_tuning(self, ms, missing) -> None:
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            missing, str(self.tuning_dir / "logs"), seed=0)
        if not contexts:  # every missing task was already scheduled by hand: nothing to tune
            return
        ms.tune.tune_tasks(
            tasks=contexts, task_weights=[float(w) for w in weights],
            work_dir=str(self.tuning_dir / "logs"),
            max_trials_global=self.trials_per_task * len(contexts),
            max_trials_per_task=self.trials_per_task,
            num_trials_per_iter=min(16, self.trials_per_task), database=self._database(),
            builder=ms.builder.LocalBuilder(max_workers=os.cpu_count() or 1,
                                            timeout_sec=BUILDER_TIMEOUT_S),
            runner=ms.runner.LocalRunner(), task_scheduler="round-robin")

    def _schedules_key(self, lowered) -> str:
        """A hash of the schedule each conv/matmul task of ``lowered`` takes from the databases
        (its trace, or none: TVM's default)."""
        import hashlib

        h = hashlib.sha256()
        keys = []
        for task in self._tuned_tasks(lowered):
            found = self._record(task)
            trace = "default" if found is None else \
                "\n".join(map(str, found[1].trace.as_python()))
            keys.append(hashlib.sha256(f"{task.task_name}:{trace}".encode()).hexdigest())
        for k in sorted(keys):
            h.update(k.encode())
        return h.hexdigest()

    def schedule_source(self, sig) -> str:
        """Where the kernel of op ``sig`` comes from: ``tuned``, ``transferred`` (from the
        transfer database) or ``default`` (TVM's own schedule: nothing in either database)."""
        found = {self._record_source(t) for t in self._tuned_tasks(self._lowered_op(sig))}
        if not found or None in found:
            return "default"
        return "tuned" if found == {"tuned"} else "transferred"

    def prepare_ops(self, sigs, *, progress: bool = False) -> None:
        if not self.tuned:
            return
        mods = [self._lowered_op(sig) for sig in sigs]
        if self.transfer:
            # tune the widest op of each family (the model's own widths, on a table's grid),
            # then give every narrower one a schedule transferred from those
            widest: dict[tuple, int] = {}
            for i, sig in enumerate(sigs):
                j = widest.get(sig.family)
                if j is None or (sig.cin * sig.cout, sig.cout) > (sigs[j].cin * sigs[j].cout,
                                                                   sigs[j].cout):
                    widest[sig.family] = i
            self._tune_missing([mods[i] for i in sorted(widest.values())], transfer=False)
        self._tune_missing(mods, progress=progress)

    def compile(self, module, inputs, *, weights: bool = False) -> Path:
        """Build ``module`` for the target; return the path of the shared library (cached).

        ``weights=True`` makes the weights part of the cache key (for export: the library
        embeds them as constants); measurement only needs the structure."""
        from tvm import relax

        tvm = self._tvm
        extra = [json.dumps(self.device.target, sort_keys=True), tvm.__version__,
                 "tuned" if self.tuned else "untuned", self.device.cross_compiler or ""]
        if weights:
            import hashlib

            h = hashlib.sha256()
            for t in module.state_dict().values():
                h.update(t.detach().cpu().numpy().tobytes())
            extra.append(h.hexdigest())
        if self.tuned:
            # the schedules the library would be built with are part of its key: a library
            # built before one of its tasks was tuned again (or with a database since moved or
            # rebuilt) is not taken for one built with the schedules there now. Finding them
            # means lowering the model (4 s for ResNet-20 here, 12 s for ResNet-56), so a
            # pointer keyed by the database's files as they are now skips that while they
            # stay unchanged
            pointer = self._pointer(module, inputs, extra)
            if pointer.is_file() and (known := Path(pointer.read_text())).is_file():
                return known
            mod = self._lower_for_tuning(self._relax_module(module, inputs))
            self._tune_missing([mod])
            path = self._library(module, inputs, [*extra, self._schedules_key(mod)])
        else:
            path = self._library(module, inputs, extra)
        if path.is_file():
            if self.tuned:
                self._point(module, inputs, extra, path)
            return path
        if not self.tuned:
            mod = self._relax_module(module, inputs)
        else:
            # what static_shape_tuning_pipeline(total_trials=0) does after lowering, with the
            # database already in memory instead of re-read from its work_dir
            with self.target, self._applied_database():
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
        if self.tuned:
            self._point(module, inputs, extra, path)
        return path

    @staticmethod
    def _library(module, inputs, extra: list[str]) -> Path:
        """Where the library of ``module`` built under ``extra`` is cached."""
        return cache_dir() / "tvm" / f"{structure_hash(module, inputs, *extra)}.so"

    def _pointer(self, module, inputs, extra: list[str]) -> Path:
        """The file naming ``module``'s library while the databases stay as they are now."""
        return cache_dir() / "tvm" / "by-database" / \
            structure_hash(module, inputs, *extra, self._database_state())

    def _database_state(self) -> str:
        """Where the databases are and the size and time of each of their files: what changes
        whenever a record is added (tuned or transferred)."""
        parts = [str(self.tuning_dir.resolve())]
        for folder in (self.tuning_dir, self.tuning_dir / "transfer"):
            for f in sorted(folder.glob("database_*.json")):
                st = f.stat()
                parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
        return "|".join(parts)

    def _point(self, module, inputs, extra: list[str], path: Path) -> None:
        """Remember that ``module`` builds to ``path`` while the databases stay as they are."""

        def write(tmp: str) -> None:
            Path(tmp).write_text(str(path))

        atomic_write(self._pointer(module, inputs, extra), write)

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
                "tuned": str(device.tuned), "torch": torch.__version__,
                **({"transfer": "True"} if device.tuned and device.tuning.get("transfer")
                   else {})}


def _arg_shapes(mod) -> tuple[tuple[int, ...], ...]:
    """The buffer shapes of a task's entry function, in argument order."""
    import tvm.s_tir.meta_schedule as ms

    return tuple(tuple(int(x) for x in a.shape)
                 for a in ms.arg_info.ArgInfo.from_entry_func(mod))


def _shape_distance(a, b) -> float:
    """How far two tasks' buffer shapes lie apart: the sum of |log(ratio)| over every
    dimension; infinite when their arguments do not line up (another computation)."""
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b, strict=True)):
        return math.inf
    return sum(abs(math.log(p / q)) for x, y in zip(a, b, strict=True)
               for p, q in zip(x, y, strict=True) if p > 0 < q)
