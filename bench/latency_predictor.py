"""Latency-predictor accuracy: for each model and device, build (or reuse) the latency table,
measure N random policies whole on the device, and compare the predictor and a fitted
MACs-proportional proxy with the measurements. Also measures each unpruned model on
onnxruntime, untuned TVM and tuned TVM side by side. Prints one JSON document.

    python bench/latency_predictor.py                       # the full benchmark
    python bench/latency_predictor.py --models resnet20 --devices cpu-ort --n 20
    python bench/latency_predictor.py --tables runs/tables  # another CPU: its own tables there
    # MobileNetV2 on a tuned TVM device, searched and profiled on a 32-channel grid
    python bench/latency_predictor.py --models mobilenetv2 --devices cpu-tvm-transfer --round-to 32
    python bench/latency_predictor.py --estimators runs/bench-latency/cpu-ort-mobilenetv2.json

Targets (issue 3): on cpu-ort >= 95% of 50 policies within +-10% and Kendall tau >= 0.9,
beating the MACs proxy on every model; on cpu-tvm >= 90% within +-10%.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autoprune.data import load_dataset  # noqa: E402
from autoprune.latency.backends import get_backend  # noqa: E402
from autoprune.latency.devices import cpu_model, get_device, runtime_versions  # noqa: E402
from autoprune.latency.profile import (  # noqa: E402
    build_table,
    estimate_scores,
    model_key,
    scatter_png,
    validate,
)
from autoprune.latency.stats import VALIDATE_PASSES  # noqa: E402
from autoprune.latency.table import table_path  # noqa: E402
from autoprune.models import ModelSpec, build_model  # noqa: E402
from autoprune.space import SearchSpace, SpaceSpec  # noqa: E402


def _first_pass_scores(v: dict) -> dict:
    """The predictor scored against the first pass alone: what one pass of measurements, in
    order, would have reported for the same policies in the same run."""
    return estimate_scores([r["predicted_ms"] for r in v["rows"]],
                           [r["measured_rounds_ms"][0] for r in v["rows"]])


ESTIMATORS = {"quickest": lambda m: m.min(axis=1),
              "lower_quartile": lambda m: np.percentile(m, 25, axis=1),
              "median": lambda m: np.median(m, axis=1), "mean": lambda m: m.mean(axis=1)}


def estimator_agreement(path: str, *, halves=(3, 5, 10), splits: int = 200) -> dict:
    """How well each way of reducing a policy's passes to one latency agrees with itself: the
    passes of a validation JSON (``measured_rounds_ms``) split at random into two disjoint
    sets of ``h`` passes, each set reduced, and Kendall tau taken between the two; the mean
    over ``splits`` random splits, per estimator and ``h``."""
    from scipy.stats import kendalltau

    rounds = np.array([r["measured_rounds_ms"] for r in json.loads(Path(path).read_text())
                       ["rows"]])
    rng = np.random.default_rng(0)
    out = {"file": path, "policies": rounds.shape[0], "passes": rounds.shape[1]}
    for name, reduce in ESTIMATORS.items():
        out[name] = {}
        for h in halves:
            if 2 * h > rounds.shape[1]:
                continue
            taus = [kendalltau(reduce(rounds[:, i[:h]]), reduce(rounds[:, i[h:2 * h]])).statistic
                    for i in (rng.permutation(rounds.shape[1]) for _ in range(splits))]
            out[name][f"{h}_passes"] = round(float(np.mean(taus)), 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--estimators", nargs="+", metavar="JSON",
                    help="measure nothing: for validation JSONs written earlier, print how well "
                    "the quickest pass, lower quartile, median and mean of a policy's passes "
                    "agree with themselves (Kendall tau between disjoint random halves)")
    ap.add_argument("--models", default="resnet20,resnet56,mobilenetv2")
    ap.add_argument("--devices", default="cpu-ort,cpu-tvm")
    ap.add_argument("--n", type=int, default=50, help="random policies per model and device")
    ap.add_argument("--rounds", type=int, default=VALIDATE_PASSES,
                    help="passes over the policies; each one's latency is its quickest pass")
    ap.add_argument("--data", default="fashion-mnist", help="sets the input shape")
    ap.add_argument("--compare-runtimes", default="cpu-ort,cpu-tvm-untuned,cpu-tvm",
                    help="devices on which each unpruned model is measured side by side")
    ap.add_argument("--out", default="runs/bench-latency", help="folder for JSON and PNGs")
    ap.add_argument("--tables", help="latency tables folder (default latency_tables/); on a CPU "
                    "the shipped tables were not measured on, name another folder, where this "
                    "CPU's tables are built, so the shipped ones stay as they are")
    ap.add_argument("--round-to", metavar="N|MODEL=N,...",
                    help="search-space channel multiple, for every model (N) or per model "
                    "(mobilenetv2=32), instead of each device's own: a tuned TVM device's "
                    "table and whole models then meet only those widths")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    try:
        round_to = _round_to(args.round_to, args.models.split(","))
    except ValueError as e:
        print(f"latency_predictor.py: error: --round-to {args.round_to!r}: {e}; pass N or "
              "MODEL=N,... (e.g. mobilenetv2=32)", file=sys.stderr)
        return 2
    if args.estimators:
        out = []
        for f in args.estimators:
            try:
                out.append(estimator_agreement(f))
            except OSError as e:
                print(f"latency_predictor.py: error: --estimators {f}: cannot read it "
                      f"({e.strerror}); pass a validation JSON an earlier run wrote",
                      file=sys.stderr)
                return 2
            except (ValueError, KeyError, TypeError, IndexError) as e:
                print(f"latency_predictor.py: error: --estimators {f}: not a validation JSON "
                      f"with the passes of each policy ({type(e).__name__}: {e}); pass one "
                      "that `--out` or `autoprune profile --validate` wrote", file=sys.stderr)
                return 2
        print(json.dumps(out, indent=2))
        return 0
    torch.set_num_threads(1)
    data = load_dataset(args.data)
    out_dir = Path(args.out)
    tables = Path(args.tables) if args.tables else None
    result = {"cpu": cpu_model(), "versions": runtime_versions(), "data": args.data,
              "n": args.n, **({"round_to": round_to} if round_to else {}), "models": {}}
    for name in args.models.split(","):
        spec = ModelSpec(name, num_classes=data.num_classes, in_channels=data.in_channels,
                         input_size=data.input_size)
        model = build_model(spec).eval()
        x = torch.zeros(data.input_shape)
        per_model = result["models"][name] = {"runtimes": {}, "predictor": {}}
        for dev_name in args.compare_runtimes.split(","):
            device = get_device(dev_name)
            with get_backend(device, **_backend_options(device, tables)) as backend:
                per_model["runtimes"][dev_name] = backend.measure_model(model,
                                                                        x.shape).to_dict()
        for dev_name in args.devices.split(","):
            device = get_device(dev_name)
            space = SearchSpace.from_model(model, x, SpaceSpec.for_family(spec.family),
                                           family=spec.family,
                                           round_to=round_to.get(name,
                                                                 device.channel_multiple))
            key = model_key(name, tuple(x.shape))
            t0 = time.perf_counter()
            with get_backend(device, **_backend_options(device, tables)) as backend:
                setup = build_table(model, space, device, backend, key=key, model_name=name,
                                    path=table_path(device.name, name, tables),
                                    progress=args.progress)
                profile_s = time.perf_counter() - t0
                pred = setup.predictor()
                t1 = time.perf_counter()
                policies = [space.uniform(r) for r in (0.3, 0.5, 0.7, 1.0)]
                reps = 2000
                for _ in range(reps):
                    for p in policies:
                        pred.predict(p)
                per_s = reps * len(policies) / (time.perf_counter() - t1)
                v = validate(setup, model, backend, n=args.n, rounds=args.rounds,
                             progress=args.progress)
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f"{dev_name}-{name}.json").write_text(json.dumps(v, indent=1))
            scatter_png(v, out_dir / f"{dev_name}-{name}.png")
            per_model["predictor"][dev_name] = {
                "table": str(setup.table.path), "entries": len(setup.table.entries),
                "profile_s": round(profile_s, 1), "predictions_per_s": round(per_s),
                "rounds": v["rounds"], "predictor": v["predictor"],
                "predictor_first_pass_only": _first_pass_scores(v),
                "macs_proxy": v["macs_proxy"], "single_scale": v["single_scale"],
                "median_iqr_pct": v["median_iqr_pct"],
                "measured_split_half_tau": v["measured_split_half_tau"],
                "calibration": v["calibration"],
                "beats_macs_proxy": (v["predictor"]["within_10pct"]
                                     >= v["macs_proxy"]["within_10pct"]
                                     and v["predictor"]["kendall_tau"]
                                     > v["macs_proxy"]["kendall_tau"])}
    print(json.dumps(result, indent=2))
    return 0


def _round_to(text: str | None, models: list[str]) -> dict[str, int]:
    """``--round-to``: N for every model, or MODEL=N pairs."""
    if not text:
        return {}
    if "=" not in text:
        n = int(text)
        pairs = {m: n for m in models}
    else:
        pairs = {}
        for part in text.split(","):
            model, sep, n = part.partition("=")
            if not sep or model not in models:
                raise ValueError(f"{part!r} names no model of --models")
            pairs[model] = int(n)
    if any(n < 1 for n in pairs.values()):
        raise ValueError("a channel multiple must be a positive integer")
    return pairs


def _backend_options(device, tables: Path | None) -> dict:
    """A tuned TVM device keeps its tuning database beside its tables, as `autoprune
    profile --tables` does: a run into another folder leaves the shipped one untouched."""
    if device.runtime != "tvm" or tables is None:
        return {}
    return {"tuning_dir": tables / device.name / "tuning"}


if __name__ == "__main__":
    sys.exit(main())
