"""Transfer tuning against tuning: how fast a transferred schedule runs next to the schedule
MetaSchedule finds for that same shape.

Takes ``--n`` conv shapes at random (``--seed``) from a `cpu-tvm-transfer` table whose
schedules were transferred (not tuned), tunes each of them exactly, on its own, with the
device's trials per task, into a fresh database, and times both kernels in alternating passes
(each one's quickest of ``--passes``). Prints one JSON document: per shape, both latencies and
their ratio (transferred / tuned), then the median, least and greatest ratio and the seconds
each way took here.

    python bench/tvm_transfer.py --tables runs/tables-s32 --model resnet20 --n 7
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autoprune.errors import UserError  # noqa: E402
from autoprune.latency.backends import get_backend  # noqa: E402
from autoprune.latency.devices import LATENCY_TABLES_DIR, get_device  # noqa: E402
from autoprune.latency.ops import OpSig  # noqa: E402
from autoprune.latency.table import LatencyTable  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu-tvm-transfer")
    ap.add_argument("--tables", help="latency tables folder (default latency_tables/)")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--n", type=int, default=7, help="shapes to compare")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--passes", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    try:
        return _run(args)
    except UserError as e:
        print(f"tvm_transfer.py: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    device = get_device(args.device)
    if not device.tuning.get("transfer"):
        raise UserError(f"device {device.name!r} does not transfer schedules; pass one whose "
                        "`tuning` sets `transfer: true`, e.g. cpu-tvm-transfer")
    root = Path(args.tables) if args.tables else LATENCY_TABLES_DIR
    path = root / device.name / f"{args.model}.json"
    if not path.is_file():
        raise UserError(f"no latency table {str(path)!r}; build it with `autoprune profile "
                        f"--target-device {device.name} --model {args.model}"
                        f"{f' --tables {args.tables}' if args.tables else ''}`")
    table = LatencyTable.load(path)
    exact = get_device("cpu-tvm")  # the same target, every shape tuned for itself
    with tempfile.TemporaryDirectory() as scratch, \
            get_backend(device, tuning_dir=root / device.name / "tuning") as moved, \
            get_backend(exact, tuning_dir=Path(scratch) / "db",
                        trials_per_task=int(device.tuning.get("trials_per_task", 32))) as tuned:
        # the table's conv entries whose kernels came from the transfer database
        transferred = [k for k in sorted(table.entries) if k.startswith("conv")
                       and moved.schedule_source(OpSig.from_key(k)) == "transferred"]
        keys = random.Random(args.seed).sample(transferred, min(args.n, len(transferred)))
        sigs = [OpSig.from_key(k) for k in keys]
        t0 = time.perf_counter()
        tuned.prepare_ops(sigs)
        tune_s = time.perf_counter() - t0
        timers = [(moved.prepare_op(s), tuned.prepare_op(s)) for s in sigs]
        runs = [([], []) for _ in sigs]
        for _ in range(args.passes):
            for (a, b), (ra, rb) in zip(timers, runs, strict=True):
                ra.append(a().median_ms)
                rb.append(b().median_ms)
    rows = {k: {"transferred_us": round(min(a) * 1e3, 2), "tuned_us": round(min(b) * 1e3, 2),
                "ratio": round(min(a) / min(b), 3)} for k, (a, b) in zip(keys, runs, strict=True)}
    ratios = [r["ratio"] for r in rows.values()]
    print(json.dumps({"device": device.name, "model": args.model, "table": str(table.path),
                      "transferred_shapes_in_table": len(transferred), "n": len(keys),
                      "trials_per_task": tuned.trials_per_task,
                      "tune_s_per_shape": round(tune_s / max(len(keys), 1), 1),
                      "median_ratio": float(np.median(ratios)), "min_ratio": min(ratios),
                      "max_ratio": max(ratios), "shapes": rows}, indent=1))
    return 0



if __name__ == "__main__":
    sys.exit(main())
