"""The export report's latency measurement, repeated: how far its measured speedup lands from
the study's prediction, the way `export` measures now against the way it measured before.
Prints one JSON document, a Markdown table on stderr and, with ``--plot``, a PNG.

    python bench/report_measurement.py --study demo [--runs runs] [--repeats 8] [--plot PATH]

The study's best policy, pruned from its base checkpoint, and the unpruned model are measured
on the study's device ``--repeats`` times, each time by `autoprune.report.measure_pair` as
`export` calls it (at least 10 alternating rounds, added to until they span 5 s; each model's
latency its quickest round). The earlier estimator is computed from the same rounds, as it
would have taken them: the first 3, then one more at a time while a model's median round ran
over 10% slower than its quickest, up to 9, each model's latency the median of its rounds.
The prediction is the study's: the latency table's (``reference.json`` and
``best_policy.json``) and, where the study checked its budget on the device, times that check's
scale, as the report states both. The issue's target: measured speedup within 5% of predicted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

OLD_ROUNDS, OLD_MAX = 3, 9  # the earlier `measure_pair`: 3 rounds, up to 3x as many


def old_estimate(u_rounds: list[float], p_rounds: list[float]) -> tuple[float, float, int]:
    """(unpruned ms, pruned ms, rounds) as the earlier `measure_pair` took them from these
    alternating rounds: rounds added while either model's median round was unsettled."""
    import numpy as np

    from autoprune.report import settled

    n = OLD_ROUNDS
    while n < min(OLD_MAX, len(u_rounds)) and not (settled(u_rounds[:n])
                                                    and settled(p_rounds[:n])):
        n += 1
    return float(np.median(u_rounds[:n])), float(np.median(p_rounds[:n])), n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", required=True, help="a study with a finished search")
    ap.add_argument("--runs", default="runs", help="the runs folder the study is in")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--plot", help="a PNG of each repeat's error, both ways")
    a = ap.parse_args()
    if a.repeats < 1:
        print("report_measurement.py: error: --repeats must be >= 1", file=sys.stderr)
        return 2

    import torch

    from autoprune import cli
    from autoprune.errors import UserError
    from autoprune.latency.backends import get_backend
    from autoprune.prune import apply_policy
    from autoprune.report import measure_pair

    torch.set_num_threads(1)
    try:
        study = cli._open_finished(SimpleNamespace(runs=a.runs, study=a.study))
        base = cli._study_base(study, SimpleNamespace(weights=None))
        device = cli._study_device(study)
        backend = get_backend(device)
    except UserError as e:
        print(f"report_measurement.py: error: {e}", file=sys.stderr)
        return 2
    best = study.best()
    ref = json.loads((study.root / "reference.json").read_text())
    predicted = ref["unpruned"]["latency_ms"] / best.latency_ms
    scale = (study.config.get("budget_check") or {}).get("scale")
    predictions = {"table": predicted, **({"checked": predicted * scale} if scale else {})}
    pruned = apply_policy(base.model, best.policy, example_input=base.example_input())

    def error(measured: float) -> dict[str, float]:
        return {k: (v - measured) / measured * 100 for k, v in predictions.items()}

    runs = []
    with backend:
        for i in range(a.repeats):
            u, p = measure_pair(backend, base.model, pruned, base.input_shape)
            ou, op, on = old_estimate(u["rounds_ms"], p["rounds_ms"])
            now, before = u["median_ms"] / p["median_ms"], ou / op
            runs.append({"now": {"speedup": now, "error_pct": error(now),
                                 "rounds": len(u["rounds_ms"]), "span_s": u["span_s"]},
                         "before": {"speedup": before, "error_pct": error(before), "rounds": on},
                         "rounds_ms": {"unpruned": u["rounds_ms"], "pruned": p["rounds_ms"]}})
            print(f"repeat {i}: speedup now {now:.3f}, before {before:.3f} (predicted "
                  + ", ".join(f"{k} {v:.3f}" for k, v in predictions.items()) + ")",
                  file=sys.stderr, flush=True)

    def summary(way: str, key: str) -> dict[str, float]:
        errs = [abs(r[way]["error_pct"][key]) for r in runs]
        return {"median_abs_error_pct": statistics.median(errs), "max_abs_error_pct": max(errs),
                "within_5pct": sum(e <= 5 for e in errs) / len(errs)}

    out = {"study": a.study, "device": device.name, "policy": best.policy.to_dict(),
           "predicted_speedup": predictions, "repeats": a.repeats,
           "torch": torch.__version__,
           "summary": {way: {k: summary(way, k) for k in predictions}
                       for way in ("now", "before")},
           "runs": runs}
    print("\n**Measured speedup against the prediction, per repeat**\n\n"
          "| estimator | prediction | median abs error | max abs error | within 5% |\n"
          "|---|---|---|---|---|", file=sys.stderr)
    names = {"now": "quickest round, rounds over 5 s (now)",
             "before": "median of 3 to 9 rounds (before)"}
    for way in ("now", "before"):
        for k in predictions:
            s = out["summary"][way][k]
            print(f"| {names[way]} | {k} | {s['median_abs_error_pct']:.1f}% | "
                  f"{s['max_abs_error_pct']:.1f}% | {s['within_5pct']:.0%} |", file=sys.stderr)
    if a.plot:
        from _output import per_item_plot

        key = "checked" if "checked" in predictions else "table"
        out["plot"] = per_item_plot(
            a.plot, {names[way]: [r[way]["error_pct"][key] for r in runs]
                     for way in ("now", "before")},
            hlines={-5: None, 5: None}, xlabel="repeat",
            ylabel=f"(predicted - measured) / measured, % ({key})",
            title=f"Speedup of study {a.study} on {device.name}")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
