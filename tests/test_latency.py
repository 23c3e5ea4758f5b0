"""Latency side: devices, measurement on onnxruntime and TVM (locally and over RPC), tables,
the predictor, validation, and every refusal through the real CLI."""

import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from autoprune.errors import UserError
from autoprune.latency.backends import get_backend
from autoprune.latency.devices import cpu_model, get_device, load_devices
from autoprune.latency.ops import OpSig, grid_signatures, model_ops
from autoprune.latency.profile import build_table, model_key, validate
from autoprune.latency.table import LatencyTable
from autoprune.models import ModelSpec, build_model
from autoprune.space import SearchSpace, SpaceSpec

from .conftest import assert_user_error, run_cli

TINY = """
from torch import nn

class Tiny(nn.Module):
    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))

def make(num_classes, in_channels):
    return Tiny(num_classes, in_channels)
"""


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("tiny") / "tiny.py"
    f.write_text(TINY)
    return f


@pytest.fixture(scope="module")
def tiny(tiny_file):
    spec = ModelSpec(f"{tiny_file}:make", num_classes=10, in_channels=1, input_size=8)
    model = build_model(spec).eval()
    x = torch.zeros(1, 1, 8, 8)
    spec_yaml = SpaceSpec(min_keep=0.25, round_to=8)
    return spec, model, SearchSpace.from_model(model, x, spec_yaml)


@pytest.fixture(scope="module")
def tiny_table(tiny, tmp_path_factory):
    spec, model, space = tiny
    device = get_device("cpu-ort")
    path = tmp_path_factory.mktemp("tables") / "cpu-ort" / "tiny.json"
    with get_backend(device) as backend:
        setup = build_table(model, space, device, backend, key=model_key(spec.name, (1, 1, 8, 8)),
                            model_name=str(spec.name), path=path, calibrate_n=4)
    return setup, path


def _good(stat):
    return math.isfinite(stat.median_ms) and stat.median_ms > 0 and stat.iqr_ms >= 0 and \
        stat.n >= 10


def test_registry_has_the_built_in_devices():
    devices = load_devices()
    for name in ("cpu-ort", "cpu-ort-2t", "cpu-tvm", "cpu-tvm-transfer", "cpu-tvm-untuned",
                 "cuda-ort", "cuda-tvm", "rpi4-tvm"):
        assert name in devices
    assert devices["cpu-ort"].threads == 1 and devices["cpu-ort-2t"].threads == 2
    assert devices["cpu-tvm"].tuned and not devices["cpu-tvm-untuned"].tuned
    assert devices["rpi4-tvm"].remote is not None
    assert all(d.channel_multiple >= 1 for d in devices.values())


def test_devices_cli_lists_usability():
    proc = run_cli("devices", "--json", check=True)
    out = json.loads(proc.stdout)
    usable = {d["name"]: d["usable"] for d in out["devices"]}
    assert usable["cpu-ort"] and usable["cpu-tvm-untuned"]
    assert not usable["rpi4-tvm"]  # remote: never contacted by a listing
    assert "onnxruntime" in out["versions"] and "tvm" in out["versions"]


@pytest.mark.parametrize("device", ["cpu-ort", pytest.param("cpu-tvm-untuned",
                                                             marks=pytest.mark.tvm)])
def test_measure_tiny_model(device, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPRUNE_CACHE", str(tmp_path))
    _, model, _ = tiny
    with get_backend(get_device(device)) as backend:
        stat = backend.measure_model(model, (1, 1, 8, 8))
        op = backend.measure_op(OpSig("conv", 8, 16, 3, 1, 1, 8, 8, "bn+relu"))
        per_op = backend.per_op(model, (1, 1, 8, 8))
    assert _good(stat) and _good(op)
    assert per_op and all(v >= 0 for v in per_op.values())


_AFFINITY_AFTER_TVM = """
import json, os
from torch import nn
from autoprune.latency.backends import get_backend
from autoprune.latency.devices import get_device
before = sorted(os.sched_getaffinity(0))
model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU()).eval()
with get_backend(get_device("cpu-tvm-untuned")) as backend:
    backend.measure_model(model, (1, 1, 8, 8))
print(json.dumps([before, sorted(os.sched_getaffinity(0))]))
"""


@pytest.mark.tvm
@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two CPUs this process may run on, and Linux's affinity calls")
def test_a_tvm_measurement_leaves_the_process_on_all_its_cpus(tmp_path):
    """TVM's thread pool pinned the thread that ran a module to CPU 0, for good: the rest of
    the process (torch's evaluation threads, `export`'s measurements after its TVM library)
    then ran on one core. Measured in a fresh process, where TVM's pool starts."""
    env = {**os.environ, "AUTOPRUNE_CACHE": str(tmp_path)}
    env.pop("TVM_BIND_THREADS", None)
    out = subprocess.run([sys.executable, "-c", _AFFINITY_AFTER_TVM], env=env, check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    before, after = json.loads(out)
    assert after == before and len(before) >= 2


@pytest.mark.slow
@pytest.mark.tvm
def test_metaschedule_tuning_beats_untuned(tmp_path, monkeypatch):
    """A few MetaSchedule trials on one conv beat the default schedule."""
    monkeypatch.setenv("AUTOPRUNE_CACHE", str(tmp_path / "cache"))
    sig = OpSig("conv", 32, 32, 3, 1, 1, 14, 14, "bn+relu")
    with get_backend(get_device("cpu-tvm-untuned")) as untuned:
        base = untuned.measure_op(sig)
    with get_backend(get_device("cpu-tvm"), tuning_dir=tmp_path / "db",
                     trials_per_task=8) as tuned_backend:
        tuned = tuned_backend.measure_op(sig)
    assert (tmp_path / "db" / "database_tuning_record.json").stat().st_size > 0
    assert tuned.median_ms < base.median_ms, (tuned, base)


def _lines(path):
    return len(path.read_text().splitlines()) if path.is_file() else 0


@pytest.mark.slow
@pytest.mark.tvm
def test_transfer_tunes_the_widest_op_and_transfers_the_rest(tmp_path, monkeypatch, capfd):
    """cpu-tvm-transfer tunes one op per family (the widest) and gives the narrower ones its
    schedule, which beats the default one; a whole model with a width never tuned then
    compiles without a tuning run. MetaSchedule's log of the tuning stays off stdout (where
    `--json` output goes)."""
    monkeypatch.setenv("AUTOPRUNE_CACHE", str(tmp_path / "cache"))
    wide = OpSig("conv", 32, 32, 3, 1, 1, 14, 14, "bn+relu")
    narrow = OpSig("conv", 16, 24, 3, 1, 1, 14, 14, "bn+relu")
    db = tmp_path / "db"
    with get_backend(get_device("cpu-tvm-transfer"), tuning_dir=db,
                     trials_per_task=8) as backend:
        backend.prepare_ops([narrow, wide])
        assert "Trial" not in capfd.readouterr().out
        assert backend.transfers == 1
        assert backend.schedule_source(wide) == "tuned"
        assert backend.schedule_source(narrow) == "transferred"
        assert _lines(db / "database_workload.json") == 1  # only the wide op was tuned
        assert _lines(db / "transfer" / "database_tuning_record.json") == 1
        moved = backend.measure_op(narrow)
    with get_backend(get_device("cpu-tvm-untuned")) as untuned:
        default = untuned.measure_op(narrow)
    assert _good(moved) and moved.median_ms < default.median_ms, (moved, default)

    tuned_records = _lines(db / "database_tuning_record.json")
    model = torch.nn.Sequential(torch.nn.Conv2d(24, 8, 3, padding=1, bias=False),
                                torch.nn.BatchNorm2d(8), torch.nn.ReLU()).eval()
    x = torch.zeros(1, 24, 14, 14)
    with get_backend(get_device("cpu-tvm-transfer"), tuning_dir=db,
                     trials_per_task=8) as backend:
        assert _good(backend.measure_model(model, (1, 24, 14, 14)))
        assert backend.transfers == 1
        lib = backend.compile(model, (x,))

        def no_lowering(*_):
            raise AssertionError("lowered again, with the databases unchanged")

        monkeypatch.setattr(backend, "_lower_for_tuning", no_lowering)
        assert backend.compile(model, (x,)) == lib
    assert _lines(db / "database_tuning_record.json") == tuned_records  # nothing tuned

    # the compiled library is keyed by the schedules it was built with: a copy of the
    # database gives the same library (found by lowering the model again, as the databases'
    # files are others); a schedule changed there, another one
    import shutil

    import tvm.s_tir.meta_schedule as ms
    from tvm.s_tir.schedule import Schedule

    shutil.copytree(db, tmp_path / "copy")
    with get_backend(get_device("cpu-tvm-transfer"), tuning_dir=tmp_path / "copy") as backend:
        assert backend.compile(model, (x,)) == lib
        task = backend._tuned_tasks(backend._lower_for_tuning(
            backend._relax_module(model, (x,))))[0]
        tuned = backend._database()
        mod = task.dispatched[0]
        sch = Schedule(mod)  # another schedule (an unrolled output loop), said quickest
        sch.unroll(sch.get_loops(sch.get_output_blocks("root")[0])[-1])
        tuned.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, tuned.commit_workload(mod), [1e-9], backend.target,
            ms.arg_info.ArgInfo.from_entry_func(mod)))
        rebuilt = backend.compile(model, (x,))
        assert rebuilt != lib and rebuilt.is_file() and lib.is_file()
        assert _good(backend.measure_model(model, (1, 24, 14, 14)))


def _zoo_model_at_8x8(name: str = "resnet20"):
    """A zoo model at 8x8 inputs, with its search space. ResNet-20's first block of stages 2
    and 3 has a 1x1 projection shortcut (the width doubles), whose add both runtimes fuse
    into one of two convs."""
    spec = ModelSpec(name, num_classes=10, in_channels=1, input_size=8)
    model = build_model(spec).eval()
    x = torch.zeros(1, 1, 8, 8)
    space = SearchSpace.from_model(model, x, SpaceSpec.for_family(spec.family),
                                   family=spec.family, round_to=8)
    return model, x, space


def test_a_projection_blocks_add_is_fused_into_its_conv2_as_onnxruntime_does(tmp_path):
    """The op signatures give the residual add of a block with a projection shortcut to the
    block's second 3x3 conv, not to the 1x1 projection: onnxruntime's optimised graph puts it
    there (the conv that takes the sum as a fourth input)."""
    import onnx
    import onnxruntime as ort

    from autoprune.latency.backends.onnxruntime import export_module

    model, x, space = _zoo_model_at_8x8()
    post = {op.name: op.post for op in model_ops(model, x, space)}
    assert post["layer2.0.conv2"] == post["layer2.1.conv2"] == "bn+add+relu"
    assert post["layer2.0.downsample.0"] == post["layer3.0.downsample.0"] == "bn"
    export_module(model, (x,), tmp_path / "m.onnx")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(tmp_path / "m.onnx"), opts, providers=["CPUExecutionProvider"])
    convs = {n.name: n for n in onnx.load(tmp_path / "opt.onnx").graph.node
             if "Conv" in n.op_type and "layer2.0/" in n.name}
    with_sum = sorted(name for name, n in convs.items() if len([i for i in n.input if i]) > 3)
    assert len(with_sum) == 1 and "conv2" in with_sum[0], sorted(convs)


@pytest.mark.tvm
@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_every_kernel_of_a_whole_model_is_one_of_its_ops_on_tvm(name):
    """Each conv/matmul task TVM makes of a whole pruned ResNet (a projection block
    included) is, structurally, the task of one of its op signatures: what a tuned device's
    table measures is what the model runs. With the add given to the projection instead,
    the projections' fused tasks matched no op (and at 14x14, neither did conv2's), and
    transfer tuning gave those kernels schedules of their own, which the table never timed.
    MobileNetV2's blocks added ``x + out`` where the op modules add the layer's output first:
    another computation to TVM, so each residual projection matched no op either."""
    import tvm_ffi

    from autoprune.policy import Policy
    from autoprune.prune import apply_policy

    model, x, space = _zoo_model_at_8x8(name)
    policy = Policy.from_dict({g.name: g.choices[len(g.choices) // 2] for g in space.groups})
    with get_backend(get_device("cpu-tvm-untuned")) as backend:
        op_tasks = {}
        for op in model_ops(model, x, space):
            for t in backend._tuned_tasks(backend._lowered_op(op.sig(policy))):
                op_tasks[tvm_ffi.structural_hash(t.dispatched[0])] = op.name
        pruned = apply_policy(model, policy, example_input=x)
        whole = backend._tuned_tasks(backend._lower_for_tuning(
            backend._relax_module(pruned, (x,))))
    assert len(whole) >= 10
    unmatched = [t.task_name for t in whole
                 if tvm_ffi.structural_hash(t.dispatched[0]) not in op_tasks]
    assert not unmatched, unmatched


def test_a_device_with_bad_tuning_options_is_refused(tmp_path):
    f = tmp_path / "devices.yaml"
    for tuning, says in (("{trials: 8}", "`tuning` takes"),
                         ("{transfer: 2}", "`tuning.transfer` must be true or false"),
                         ("{trials_per_task: 0}", "`tuning.trials_per_task` must be")):
        f.write_text("devices:\n  mine:\n    runtime: tvm\n    target: {kind: llvm}\n"
                     f"    tuning: {tuning}\n")
        assert_user_error(run_cli("devices", "--devices", str(f)), says)


def test_table_covers_the_grid(tiny, tiny_table):
    _, model, space = tiny
    setup, path = tiny_table
    ops = model_ops(model, torch.zeros(1, 1, 8, 8), space)
    assert [o.name for o in ops] == ["conv1", "conv2", "fc"]
    assert [o.post for o in ops] == ["bn+relu", "bn+relu", ""]
    sigs = grid_signatures(ops, space, 8)
    # conv1: 1 x {8,16}; conv2: {8,16} x {8,16,24,32}; fc: {8,16,24,32} x 10
    assert len(sigs) == 2 + 8 + 4
    assert set(setup.table.entries) == {s.key for s in sigs}
    again = LatencyTable.load(path)
    assert again.entries == setup.table.entries
    assert again.calibration[setup.key].n == 6  # full + smallest + 4 random
    assert again.versions["onnxruntime"]


def test_predictor_exact_on_grid_and_monotone(tiny_table):
    setup, _ = tiny_table
    pred = setup.predictor()
    for key, stat in setup.table.entries.items():
        sig = OpSig.from_key(key)
        assert pred.op_cost(sig) >= stat.median_ms - 1e-12
    raw = setup.predictor(calibrated=False)
    # exact where the measurements are already monotone, e.g. the smallest point per family
    smallest = {}
    for key, stat in setup.table.entries.items():
        sig = OpSig.from_key(key)
        if sig.family not in smallest or (sig.cin, sig.cout) < smallest[sig.family][0]:
            smallest[sig.family] = ((sig.cin, sig.cout), sig, stat.median_ms)
    for _, sig, ms in smallest.values():
        assert raw.op_cost(sig) == ms
    # non-decreasing along every group's channel multiples
    space = setup.space
    base = space.smallest().to_dict()
    for g in space.groups:
        values = [pred.predict({**base, g.name: c}) for c in g.choices if c % 8 == 0]
        assert all(b >= a - 1e-12 for a, b in itertools.pairwise(values)), (g.name, values)
    # off-grid widths interpolate between their neighbours
    mid = OpSig("conv", 12, 24, 3, 2, 1, 8, 8, "bn+relu")
    lo, hi = OpSig("conv", 8, 24, 3, 2, 1, 8, 8, "bn+relu"), \
        OpSig("conv", 16, 24, 3, 2, 1, 8, 8, "bn+relu")
    assert pred.op_cost(lo) <= pred.op_cost(mid) <= pred.op_cost(hi)
    assert pred.cheapest_completion({}) == pytest.approx(pred.min_latency())
    costs = pred.group_costs(space.full())
    assert sum(costs.values()) == pytest.approx(pred.max_latency())


def test_validation_end_to_end(tiny, tiny_table, capsys):
    _, model, _ = tiny
    setup, _ = tiny_table
    with get_backend(setup.device) as backend:
        result = validate(setup, model, backend, n=5, rounds=3, progress=True)
    # in a log: the models' builds are counted (on a tuned device, minutes), then the passes
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-2].startswith("build models (cpu-ort) 5/5 elapsed"), lines
    assert lines[-1].startswith("validate 15/15 elapsed"), lines
    assert result["n"] == 5 and len(result["rows"]) == 5 and result["rounds"] == 3
    for r in result["rows"]:  # each policy measured once per pass; the quickest is reported
        assert len(r["measured_rounds_ms"]) == 3
        assert r["measured_ms"] == min(r["measured_rounds_ms"])
        assert r["measured_median_ms"] == pytest.approx(sorted(r["measured_rounds_ms"])[1])
    for est in ("predictor", "macs_proxy", "single_scale"):
        assert set(result[est]) == {"mean_abs_pct_error", "within_10pct", "kendall_tau"}
        assert 0 <= result[est]["within_10pct"] <= 100
    assert all(r["measured_ms"] > 0 and r["predicted_ms"] > 0 for r in result["rows"])
    # the measurement against itself: passes 0 and 2 against pass 1
    from scipy.stats import kendalltau

    passes = np.array([r["measured_rounds_ms"] for r in result["rows"]])
    assert result["measured_split_half_tau"] == pytest.approx(kendalltau(
        passes[:, [0, 2]].min(axis=1), passes[:, 1]).statistic)
    # no depthwise scale in this table: one fitted line over the same sums ranks the same
    # policies, reversed where noise on 5 tiny models fits it a negative slope (seen in CI)
    assert not setup.table.calibration[setup.key].kind_scales
    assert abs(result["single_scale"]["kendall_tau"]) == \
        pytest.approx(abs(result["predictor"]["kendall_tau"]))


def test_passes_time_each_model_prepared_once_in_alternating_order(tiny):
    """`measure_alternating` times prepared models (exported once: an onnxruntime session per
    model, whatever the passes), every other pass backwards, carrying the alternation on where
    a caller adds passes; `quickest_of_passes` keeps the quickest pass's median and IQR."""
    from autoprune.latency.profile import (
        measure_alternating,
        prepare_models,
        quickest_of_passes,
    )
    from autoprune.latency.stats import LatencyStat

    _, model, _ = tiny
    order = []

    def timer(i):
        def measure():
            order.append(i)
            return LatencyStat(1.0 + i, 0.1, 20)
        return measure

    stats = measure_alternating([timer(0), timer(1), timer(2)], rounds=3)
    more = measure_alternating([timer(0), timer(1), timer(2)], rounds=1, start=3)
    assert order == [0, 1, 2, 2, 1, 0, 0, 1, 2, 2, 1, 0]
    assert [len(st) for st in stats] == [3, 3, 3] and [len(st) for st in more] == [1, 1, 1]
    assert quickest_of_passes([LatencyStat(2.0, 0.3, 20), LatencyStat(1.5, 0.2, 30),
                               LatencyStat(1.7, 0.1, 25)]) == LatencyStat(1.5, 0.2, 75)

    exports = []
    with get_backend(get_device("cpu-ort")) as backend:
        export = backend._prepare_module

        def counted(module, inputs):
            exports.append(module)
            return export(module, inputs)

        backend._prepare_module = counted
        timers = prepare_models(backend, [model, model], (1, 1, 8, 8))
        real = measure_alternating(timers, rounds=4)
    assert len(exports) == 2  # one export and session per model, not one per pass
    assert all(len(st) == 4 and all(s.median_ms > 0 and s.n >= 1 for s in st) for st in real)


def test_profile_and_predict_cli(tiny_file, tmp_path):
    table = tmp_path / "t.json"
    proc = run_cli("profile", "--target-device", "cpu-ort", "--model", f"{tiny_file}:make",
                   "--data", "digits", "--table", table, "--calibrate", "3", "--validate", "4",
                   "--validate-rounds", "2", "--out", tmp_path / "val", "--json", "--quiet",
                   check=True)
    out = json.loads(proc.stdout)
    assert out["entries"] > 0 and out["validation"]["n"] == 4
    assert out["validation"]["rounds"] == 2
    assert (tmp_path / "val").glob("*.png")
    pngs = list((tmp_path / "val").glob("*.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:4] == b"\x89PNG"
    # incremental: a second run measures nothing new and keeps the entries
    before = json.loads(table.read_text())["entries"]
    run_cli("profile", "--target-device", "cpu-ort", "--model", f"{tiny_file}:make", "--data",
            "digits", "--table", table, "--quiet", check=True)
    assert json.loads(table.read_text())["entries"] == before
    # --recalibrate: new whole-model runs (2 random + full + smallest), the same op entries
    proc = run_cli("profile", "--target-device", "cpu-ort", "--model", f"{tiny_file}:make",
                   "--data", "digits", "--table", table, "--recalibrate", "--calibrate", "2",
                   "--json", "--quiet", check=True)
    assert json.loads(proc.stdout)["calibration"]["n"] == 4
    assert json.loads(table.read_text())["entries"] == before
    assert json.loads(table.read_text())["calibration"][out["model"]]["n"] == 4
    proc = run_cli("predict", "--target-device", "cpu-ort", "--model", f"{tiny_file}:make",
                   "--data", "digits", "--table", table, "--json", check=True)
    pred = json.loads(proc.stdout)
    assert pred["predicted_ms"] == pytest.approx(pred["full_ms"])
    assert pred["smallest_ms"] < pred["full_ms"]
    saved = table.read_text()
    for flag, value, words in (("--validate", "2", "at least 3 policies"),
                               ("--validate-rounds", "0", "at least 1 pass"),
                               ("--calibrate", "1", "at least 2 random")):
        extra = [] if flag == "--validate" else ["--validate", "4"]
        assert_user_error(run_cli("profile", "--target-device", "cpu-ort", "--model",
                                  f"{tiny_file}:make", "--data", "digits", "--table", table,
                                  *extra, flag, value), words)
    assert table.read_text() == saved


def test_measure_cli_with_policy(tmp_path):
    policy = tmp_path / "p.json"
    policy.write_text(json.dumps({"channels": {"layer3.0.conv2": 16}}))
    full = json.loads(run_cli("measure", "--target-device", "cpu-ort", "--model", "resnet20",
                              "--data", "digits", "--json", check=True).stdout)
    small = json.loads(run_cli("measure", "--target-device", "cpu-ort", "--model", "resnet20",
                               "--data", "digits", "--policy", policy, "--json",
                               check=True).stdout)
    assert full["median_ms"] > 0 and small["median_ms"] > 0 and full["n"] >= 10


# ------------------------------------------------------------------------------- refusals
@pytest.fixture()
def table_copy(tiny_table, tmp_path):
    _, path = tiny_table
    copy = tmp_path / "t.json"
    copy.write_text(path.read_text())
    return copy


def _predict(tiny_file, table):
    return run_cli("predict", "--target-device", "cpu-ort", "--model", f"{tiny_file}:make",
                   "--data", "digits", "--table", table)


@pytest.mark.parametrize("field,value,needle", [
    ("device", "cpu-ort-2t", "measured on device 'cpu-ort-2t'"),
    ("versions.onnxruntime", "0.0.1", "its onnxruntime is '0.0.1'"),
    ("cpu", "Some Other CPU", "measured on CPU 'Some Other CPU'"),
])
def test_table_for_another_device_version_or_cpu(tiny_file, table_copy, field, value, needle):
    d = json.loads(table_copy.read_text())
    target = d["provenance"]
    *parents, last = field.split(".")
    for p in parents:
        target = target[p]
    target[last] = value
    table_copy.write_text(json.dumps(d))
    before = table_copy.read_text()
    # the command it suggests rebuilds this very table, not the default one
    assert_user_error(_predict(tiny_file, table_copy), needle, f"--table {table_copy} --rebuild`")
    assert table_copy.read_text() == before


# /proc/cpuinfo's first block (trimmed) of a machine here that calls itself "AMD EPYC"
# (family 26), and the same with another family: the tables shipped until 2026-11-22 were
# measured on an "AMD EPYC" on which ResNet-56 ran in 1.73 ms on cpu-ort, against 1.09 ms on
# this one.
EPYC_OLD = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n" \
    "model name\t: AMD EPYC\nstepping\t: 1\n\nprocessor\t: 1\ncpu family\t: 99\n"
EPYC_NEW = EPYC_OLD.replace("cpu family\t: 25\nmodel\t\t: 1", "cpu family\t: 26\nmodel\t\t: 2")
# A Raspberry Pi 4 (Cortex-A72): ARM's cpuinfo names no model, only these numbers.
RPI4 = "processor\t: 0\nBogoMIPS\t: 108.00\nCPU implementer\t: 0x41\nCPU architecture: 8\n" \
    "CPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n"


def test_cpu_identity_tells_generations_apart():
    old, new = cpu_model(EPYC_OLD), cpu_model(EPYC_NEW)
    assert old == "AMD EPYC (cpu family 25, model 1, stepping 1)"  # the first processor's
    assert new == "AMD EPYC (cpu family 26, model 2, stepping 1)" != old
    assert cpu_model(RPI4).endswith(
        "(CPU implementer 0x41, CPU part 0xd08, CPU variant 0x0, CPU revision 3)")
    try:  # this host's own /proc/cpuinfo, where there is one
        info = open("/proc/cpuinfo").read()
    except OSError:
        info = ""
    if "cpu family" in info:
        assert "(cpu family " in cpu_model()


def test_table_without_the_cpu_generation_is_refused(tiny_file, table_copy):
    """A table written before the CPU's family was recorded names only the model ("AMD
    EPYC"): it may come from another generation of that name, so it is refused here too."""
    d = json.loads(table_copy.read_text())
    here = d["provenance"]["cpu"]
    assert here == cpu_model()
    d["provenance"]["cpu"] = here.split(" (")[0]
    table_copy.write_text(json.dumps(d))
    line = assert_user_error(_predict(tiny_file, table_copy), "measured on CPU", "--rebuild")
    if " (" in here:  # /proc/cpuinfo gave the family: the refusal says why the name is not enough
        assert "does not say which generation" in line


def test_calibration_measures_more_runs_where_a_kind_has_its_own_scale():
    """MobileNetV2's depthwise convs may get a scale of their own, which 16 random runs left
    undetermined on a noisy machine: a model with them is calibrated on 32 by default."""
    from autoprune.latency.profile import CALIBRATE_N, CALIBRATE_N_KINDS, calibration_count

    counts = {}
    for name in ("resnet20", "mobilenetv2"):
        spec = ModelSpec(name, num_classes=10, in_channels=1, input_size=28)
        model = build_model(spec).eval()
        x = torch.zeros(1, 1, 28, 28)
        space = SearchSpace.from_model(model, x, SpaceSpec.for_family(spec.family), round_to=8)
        counts[name] = calibration_count(model_ops(model, x, space))
    assert counts == {"resnet20": CALIBRATE_N, "mobilenetv2": CALIBRATE_N_KINDS}
    assert CALIBRATE_N_KINDS > CALIBRATE_N


def test_corrupt_table(tiny_file, table_copy):
    table_copy.write_text(table_copy.read_text()[:200])
    assert_user_error(_predict(tiny_file, table_copy), "is corrupt", str(table_copy))


def test_missing_entry(tiny_file, table_copy):
    d = json.loads(table_copy.read_text())
    gone = sorted(k for k in d["entries"] if k.startswith("linear"))
    for k in gone:
        del d["entries"][k]
    table_copy.write_text(json.dumps(d))
    assert_user_error(_predict(tiny_file, table_copy), "no entry for op linear|",
                      "autoprune profile", f"--table {table_copy}`")


def test_missing_table_unknown_device_and_bad_devices_file(tiny_file, tmp_path):
    assert_user_error(_predict(tiny_file, tmp_path / "none.json"), "no latency table",
                      "autoprune profile", f"--table {tmp_path / 'none.json'}`")
    assert_user_error(run_cli("measure", "--target-device", "tpu-9000", "--model", "resnet20",
                              "--data", "digits"), "unknown target device 'tpu-9000'")
    bad = tmp_path / "d.yaml"
    bad.write_text("devices:\n  mine: {runtime: onnxruntime, provider: CPUExecutionProvider, "
                   "threds: 2}\n")
    assert_user_error(run_cli("devices", "--devices", bad), "unknown key 'threds'")
    assert_user_error(run_cli("measure", "--target-device", "cuda-tvm", "--model", "resnet20",
                              "--data", "digits"), "not usable here")


# ------------------------------------------------------------------------------- RPC
@pytest.mark.tvm
def test_rpc_measurement(rpc_server, tmp_path):
    devices = tmp_path / "devices.yaml"
    devices.write_text(
        "devices:\n  loopback-tvm:\n    runtime: tvm\n    target: {kind: llvm, num-cores: 1}\n"
        f"    threads: 1\n    remote: {{host: 127.0.0.1, port: {rpc_server}}}\n")
    env_cache = tmp_path / "cache"
    import os

    os.environ["AUTOPRUNE_CACHE"] = str(env_cache)
    try:
        proc = run_cli("measure", "--target-device", "loopback-tvm", "--devices", devices,
                       "--model", "resnet20", "--data", "digits", "--json", check=True)
    finally:
        del os.environ["AUTOPRUNE_CACHE"]
    out = json.loads(proc.stdout)
    assert out["device"] == "loopback-tvm" and out["median_ms"] > 0 and out["n"] >= 10


def test_rpc_unreachable_is_a_user_error(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    devices = tmp_path / "devices.yaml"
    devices.write_text(
        "devices:\n  gone-tvm:\n    runtime: tvm\n    target: {kind: llvm, num-cores: 1}\n"
        f"    remote: {{host: 127.0.0.1, port: {port}}}\n")
    assert_user_error(run_cli("measure", "--target-device", "gone-tvm", "--devices", devices,
                              "--model", "resnet20", "--data", "digits"),
                      "cannot reach the TVM RPC server")


def test_op_signature_key_round_trip():
    sig = OpSig("depthwise", 96, 96, 3, 2, 1, 14, 14, "bn+relu6")
    assert OpSig.from_key(sig.key) == sig
    with pytest.raises(UserError, match="unknown target device 'nope'"):
        get_device("nope")


def test_finer_search_grid_is_measured_and_the_wall_allows_for_it(tiny, tmp_path, digits):
    """Searching every 4 channels on a device whose multiple is 8 measures every width of that
    grid: onnxruntime runs a width between two multiples of 8 on other kernels (ResNet-56's
    20-wide layers measured as slow as 24-wide ones, or slower), which interpolating between
    16 and 24 cannot see. The predictor returns such a width's own measurement, and where it
    costs more than a wider one, amc's wall still builds only feasible policies."""
    import dataclasses

    from autoprune.evaluate import Evaluator
    from autoprune.latency.predictor import LatencyPredictor
    from autoprune.search import BudgetWall
    from autoprune.search.amc import PruningEnv

    spec, model, _ = tiny
    space = SearchSpace.from_model(model, torch.zeros(1, 1, 8, 8),
                                   SpaceSpec(min_keep=0.25, round_to=4))
    device = get_device("cpu-ort")
    assert device.channel_multiple == 8 and device.grid_multiple == 1
    key = model_key(spec.name, (1, 1, 8, 8))
    with get_backend(device) as backend:
        setup = build_table(model, space, device, backend, key=key, model_name=str(spec.name),
                            path=tmp_path / "fine.json", calibrate_n=2)
    conv2 = [op for op in setup.ops if op.name == "conv2"][0]
    g1, g2 = conv2.in_group, conv2.out_group
    assert {12, 20, 28} <= set(space.group(g2).choices)
    for c1, c2 in itertools.product(space.group(g1).choices, space.group(g2).choices):
        assert conv2.sig({g1: c1, g2: c2}).key in setup.table.entries
    sig20 = conv2.sig({g1: 16, g2: 20})
    raw = setup.predictor(calibrated=False)
    assert raw.op_cost(sig20) == setup.table.entries[sig20.key].median_ms  # not interpolated
    # make width 20 dearer than 24 (as onnxruntime can): the wall must step around it
    table = dataclasses.replace(setup.table, entries=dict(setup.table.entries))
    for c1 in space.group(g1).choices:
        k = conv2.sig({g1: c1, g2: 20}).key
        table.entries[k] = dataclasses.replace(table.entries[k],
                                               median_ms=table.entries[k].median_ms * 20)
    pred = LatencyPredictor(table, space, setup.ops, model_key=key, channel_multiple=8)
    at = {c: pred.predict({g1: 16, g2: c}) for c in (16, 20, 24)}
    assert at[20] > at[24] >= at[16]  # non-decreasing across multiples, not increasing
    wall = BudgetWall(space, pred, at[24])
    assert wall.clip({g1: 16}, g2, 20) == 16 and wall.clip({g1: 16}, g2, 24) == 24
    # the env's budget is never under the floor (the CLI refuses one): on a table as noisy as
    # this tiny model's can be (a calibration scale of -0.22 once) the smallest policy may
    # predict above at[24], and the wall hands out the minimum unchecked
    budget = max(at[24], pred.min_latency())
    ev = Evaluator(model, digits, space, pred, budget_ms=budget, val_images=100, bn_batches=1)
    for action in ("wall", "share", "bounds"):
        seen = []
        env = PruningEnv(space, pred, budget,
                         lambda p, ep, seen=seen: seen.append(p) or ev.evaluate(p),
                         action=action)
        rng = np.random.default_rng(0)
        for _ in range(40):
            env.reset()
            done = False
            while not done:
                _, _, done, _, _ = env.step(rng.uniform(0, 1, size=1).astype(np.float32))
        assert all(pred.predict(p) <= budget * (1 + 1e-9) for p in seen), action


def test_adding_to_a_table_puts_new_entries_on_its_timebase(tiny, tmp_path, caplog):
    """A table extended later (here: a finer search grid) was measured at two times, and this
    machine's speed moves between sessions (1.2 to 1.3x here). The run re-measures some of the
    table's entries and scales the new ones to match, so a width added later is not cheap
    merely because it was measured on a faster spell: make the stored entries 10x slower than
    now, and the widths added between them still cost what their neighbours cost. The table
    is measured here, just before: with the module's table, measured minutes earlier, the
    scale once came out 1.01 in CI (the machine's speed had moved by about as much). Even
    seconds apart the tiny model's ops moved 1.5x once in CI (a factor of 1.6 came out 2.44)
    and 1.75x another time (a factor of 4 came out 2.28: this machine's slow state costs an op
    of microseconds most), so the factor is large and the bounds allow the speed to move 0.33
    to 3.3x."""
    import dataclasses
    import logging

    spec, model, space8 = tiny
    path8 = tmp_path / "fresh" / "cpu-ort" / "tiny.json"
    device = get_device("cpu-ort")
    with get_backend(device) as backend:
        build_table(model, space8, device, backend, key=model_key(spec.name, (1, 1, 8, 8)),
                    model_name=str(spec.name), path=path8, calibrate_n=2)
    path = tmp_path / "cpu-ort" / "tiny.json"
    table = LatencyTable.load(path8)
    table.entries = {k: dataclasses.replace(v, median_ms=v.median_ms * 10.0)
                     for k, v in table.entries.items()}
    table.save(path)
    key = model_key(spec.name, (1, 1, 8, 8))
    space4 = SearchSpace.from_model(model, torch.zeros(1, 1, 8, 8),
                                    SpaceSpec(min_keep=0.25, round_to=4))
    with get_backend(device) as backend, caplog.at_level(logging.INFO, "autoprune"):
        setup = build_table(model, space4, device, backend, key=key, model_name=str(spec.name),
                            path=path, calibrate_n=2)
        stored = LatencyTable.load(path)
        (ext,) = stored.extensions  # kept in the table's provenance
        assert setup.extension == ext  # and told to the caller (`profile` prints it)
        added = set(stored.entries) - set(table.entries)
        assert ext["added"] == len(added) > 0 and ext["anchors"] >= 4
        assert 3.0 < ext["scale"] < 30.0, ext
        assert "new entries were scaled by" in caplog.text
        conv2 = [op for op in setup.ops if op.name == "conv2"][0]
        g1, g2 = conv2.in_group, conv2.out_group
        at = {c: stored.entries[conv2.sig({g1: 16, g2: c}).key].median_ms for c in (16, 20, 24)}
        assert conv2.sig({g1: 16, g2: 20}).key in added
        assert at[20] > 0.8 * min(at[16], at[24]), at  # ~0.1x without the scaling
        # nothing to add: nothing measured again, no record
        assert build_table(model, space4, device, backend, key=key, model_name=str(spec.name),
                           path=path).extension is None
    assert len(LatencyTable.load(path).extensions) == 1


def test_a_new_table_takes_entries_from_finished_tables_of_the_device_not_from_one_being_written(
        tiny, tiny_table, tmp_path):
    """Two processes may profile into one folder at once (two workers of a shared study did,
    in CI): a table being written sits under a hidden temporary name, renamed over its table a
    moment later. A new table takes what the finished tables of the device hold, and never
    reads the hidden file (it once vanished between the listing and the read: a traceback)."""
    import dataclasses

    spec, model, space = tiny
    _, src = tiny_table
    folder = tmp_path / "cpu-ort"
    folder.mkdir()
    finished = LatencyTable.load(src)
    finished.save(folder / "other.json")
    half_written = dataclasses.replace(finished, entries={
        k: dataclasses.replace(v, median_ms=1e6) for k, v in finished.entries.items()})
    half_written.save(folder / ".tiny.json.x1y2z3.json")
    device = get_device("cpu-ort")
    with get_backend(device) as backend:
        setup = build_table(model, space, device, backend, key=model_key(spec.name, (1, 1, 8, 8)),
                            model_name=str(spec.name), path=folder / "tiny.json", calibrate_n=2)
    assert setup.table.entries == finished.entries  # all of them reused, none measured again
    assert setup.extension is None


def test_coarse_profile_grid_interpolates(tiny, tmp_path):
    """A device may measure its table every 16 channels while searching every 8: widths in
    between are interpolated, never missing."""
    import dataclasses

    spec, model, space = tiny
    device = dataclasses.replace(get_device("cpu-ort"), profile_multiple=16)
    with get_backend(device) as backend:
        setup = build_table(model, space, device, backend, key=model_key(spec.name, (1, 1, 8, 8)),
                            model_name=str(spec.name), path=tmp_path / "coarse.json",
                            calibrate_n=2)
    # conv2's output group (32 wide) is measured at 8 (its lower bound), 16 and 32: never 24
    assert not any("x24|" in k for k in setup.table.entries)
    pred = setup.predictor()
    conv2 = [op for op in setup.ops if op.name == "conv2"][0]
    at = {c: pred.op_cost(conv2.sig({conv2.in_group: 16, conv2.out_group: c}))
          for c in (16, 24, 32)}
    assert at[16] <= at[24] <= at[32]
    assert all(math.isfinite(pred.predict(p)) for p in
               [space.uniform(r) for r in (0.25, 0.5, 0.75, 1.0)])


def test_kind_calibration_fits_depthwise_apart_only_where_it_predicts_better():
    from autoprune.latency.profile import fit_calibration, fit_kind_calibration

    rng = np.random.default_rng(0)
    rest, dw = rng.uniform(0.3, 0.7, 18), rng.uniform(0.1, 0.4, 18)
    # depthwise ops timed alone cost 2.5x what they cost in the network (MobileNetV2 here)
    measured = 0.95 * rest + 0.4 * dw + 0.02 + rng.normal(0, 0.003, 18)
    scale, offset, kinds = fit_kind_calibration(rest, {"depthwise": dw}, measured)
    assert scale == pytest.approx(0.95, abs=0.05) and offset == pytest.approx(0.02, abs=0.02)
    assert kinds["depthwise"] == pytest.approx(0.4, abs=0.05)
    # one scale for every op: the extra term does not predict left-out runs better
    measured = 0.9 * (rest + dw) - 0.05 + rng.normal(0, 0.003, 18)
    assert fit_kind_calibration(rest, {"depthwise": dw}, measured) == \
        (*fit_calibration(rest + dw, measured), {})
    # a depthwise cost that never changes is part of the offset
    fixed = np.full(18, 0.2)
    assert fit_kind_calibration(rest, {"depthwise": fixed}, measured)[2] == {}


def test_predictor_applies_kind_scales(tiny_table, tmp_path):
    from autoprune.latency.table import Calibration

    setup, path = tiny_table
    cal = setup.table.calibration[setup.key]
    raw = setup.predictor(calibrated=False)
    table = LatencyTable.load(path)
    table.calibration[setup.key] = Calibration(cal.scale, cal.offset_ms, cal.n,
                                               cal.fit_mean_abs_pct, {"linear": 0.5})
    table.save(tmp_path / "kinds.json")
    again = LatencyTable.load(tmp_path / "kinds.json")
    assert again.calibration[setup.key].kind_scales == {"linear": 0.5}
    pred = type(setup)(setup.device, setup.space, setup.ops, again, setup.key).predictor()
    for policy in (setup.space.full(), setup.space.smallest(), setup.space.uniform(0.5)):
        ms = raw.ops_ms(policy.to_dict())
        want = sum((0.5 if op.kind == "linear" else cal.scale) * m
                   for op, m in zip(setup.ops, ms, strict=True)) + cal.offset_ms
        assert pred.predict(policy) == pytest.approx(want)
        assert sum(pred.group_costs(policy).values()) == pytest.approx(want)


def test_calibration_fit_recovers_a_line_and_refuses_a_flat_one():
    from autoprune.latency.profile import SCALE_RANGE, fit_calibration

    rng = np.random.default_rng(0)
    sums = np.linspace(0.3, 0.7, 18)
    measured = 0.9 * sums - 0.1 + rng.normal(0, 0.002, sums.size)
    scale, offset = fit_calibration(sums, measured)
    assert scale == pytest.approx(0.9, abs=0.03) and offset == pytest.approx(-0.1, abs=0.02)
    # a busy machine: the whole-model runs hardly follow the sum of ops, and a free line would
    # make pruning look free (the fit that made a test table claim 0.92 at the smallest policy)
    flat = np.array([0.0586, 0.0551, 0.0575, 0.0560, 0.0590])
    sums = np.array([0.066, 0.031, 0.048, 0.052, 0.041])
    assert not SCALE_RANGE[0] <= np.polyfit(sums, flat, 1, w=1 / flat)[0] <= SCALE_RANGE[1]
    scale, offset = fit_calibration(sums, flat)
    assert offset == 0.0 and scale > 0
    assert (scale * sums[1]) / (scale * sums[0]) == pytest.approx(sums[1] / sums[0])


def test_shipped_tables_fit_the_pinned_runtimes():
    """Every table in latency_tables/ was measured with the runtime versions pyproject.toml
    pins, and those are installed here: a new onnxruntime release (1.32.0, 2026-11-23) would
    otherwise turn every shipped cpu-ort table away on a fresh install."""
    from importlib.metadata import version
    from pathlib import Path

    import tomllib
    from packaging.requirements import Requirement

    from autoprune.latency.backends import BACKENDS

    root = Path(__file__).resolve().parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {r.name: r for r in map(Requirement, deps)}
    dist = {"onnxruntime": "onnxruntime", "tvm": "apache-tvm", "tvm_ffi": "apache-tvm-ffi"}
    tables = sorted((root / "latency_tables").glob("*/*.json"))
    assert tables
    for path in tables:
        table = LatencyTable.load(path)
        for key, name in dist.items():
            have = table.versions.get(key)
            if have is None:
                continue
            spec = str(pins[name].specifier)
            assert spec == f"=={have}", f"{path}: measured with {name} {have}, pinned {spec}"
            assert version(name) == have, f"{path}: {name} {version(name)} installed"
        # and nothing else stands between it and this install (but the CPU, on another one)
        device = get_device(table.device)
        why = table.mismatch(device, BACKENDS[device.runtime]().static_versions(device))
        assert why is None or why.startswith("it was measured on CPU"), f"{path}: {why}"
