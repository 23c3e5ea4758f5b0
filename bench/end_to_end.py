"""End-to-end benchmark: searched policies vs uniform vs Torch-Pruning's global magnitude
pruning, each fine-tuned the same way, measured on the target device. Prints one JSON document.

For every model x budget x seed:
  * ``amc``, ``evolution``, ``uniform``: `autoprune search --seed S` -> `autoprune finetune
    --distill --seed S` -> `autoprune export --format onnx` (the real CLI, one study each under
    ``--runs``; a re-run resumes every study and skips finished fine-tunes). Runs folders from
    before 2026-11-23 fine-tuned every seed with seed 0: `finetune` refuses to resume those at
    another seed (the row shows its error), so point ``--runs`` at a fresh folder;
  * ``tp-global``: what a user would do without autoprune: torch-pruning's MagnitudePruner
    with ``global_pruning=True`` (L1 magnitude, the device's channel multiple as ``round_to``,
    classifier ignored), its pruning ratio chosen so that the *measured* latency on the device
    is within the same budget (the least pruning that fits, scanning ratios up to 0.9), then the
    same fine-tune (epochs, lr, distillation).

``--screen K``: ``amc`` and ``evolution`` are fine-tuned with `autoprune finetune --screen K`
(each of the study's K leading distinct candidates that measure within the budget fine-tuned
for ``--screen-epochs``, then the best of them by val accuracy for ``--epochs``); their rows
are named ``evolution+screenK``, their checkpoint and export ``screenK.pt`` and
``export-screenK`` in the study, beside an unscreened run's.

Every method reports test accuracy (before and after fine-tune), measured latency of unpruned
and pruned (alternating rounds in one process) and the speedup; the searched ones also their
predicted speedup. Targets (issue 5): searched >= uniform + 0.3 points and >= tp-global at
budget 0.3; measured speedup within 5% of predicted. Rows measured while the machine was busy
(a latency IQR over 5% of its median, or rounds whose median stayed over 10% above the
quickest after the added ones: ``autoprune.report.measure_pair``) are listed under
``checks[...]["noisy_measurements"]``: run the same command again to measure them again
(``--methods`` can name just those).

A progress bar (or, in a log file, a line per run) follows the runs on stderr; at the end the
results also go to stderr as Markdown tables, and a plot of test accuracy against measured
latency to ``end_to_end.png`` in ``--runs`` (``--plot``). ``--render OUT.json ...`` prints the
tables and draws the plot of earlier runs' JSON outputs without running anything.

    python bench/end_to_end.py --models resnet20 --budgets 0.5 --trials 60 --epochs 2
    python bench/end_to_end.py --models resnet20,resnet56 --budgets 0.5,0.3 \\
        --weights resnet56=runs/resnet56-fashion-mnist.pt --trials 300 --epochs 10 \
        --round-to 4 --tables runs/bench-e2e/tables
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = {"resnet20": ROOT / "autoprune" / "weights" / "resnet20-fashion-mnist.pt"}
SEARCHED = ("amc", "evolution", "uniform")
NOISY_IQR = 0.05  # a latency's IQR over its median above which a row is suspect


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cli(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "autoprune.cli", *map(str, args)]
    log(" ".join(map(str, args)))
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def run_searched(method, weights, budget, seed, a) -> dict:
    study = f"{Path(weights).stem}-b{budget:g}-{method}-s{seed}"
    extra = (["--round-to", a.round_to] if a.round_to else []) + \
        (["--tables", a.tables] if a.tables else [])
    t0 = time.perf_counter()
    s = cli("search", "--target-device", a.device, "--weights", weights, "--latency-budget",
            budget, "--searcher", method, "--trials", a.trials, "--seed", seed, "--study", study,
            "--runs", a.runs, "--quiet", *extra)
    if s.returncode != 0:
        return {"method": method, "error": (s.stderr.strip().splitlines() or ["?"])[-1]}
    search_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    # --weights also for these: a runs folder copied from elsewhere still finds its base
    # the seed fine-tunes too (as tp-global's), so a row per seed samples both
    # --screen: the searched winners' fine-tune picks among the top contenders first (uniform
    # has one policy); the screened checkpoint has its own name, so both can be compared
    screened = a.screen > 1 and method != "uniform"
    ckpt = Path(a.runs) / study / "finetune" / (f"screen{a.screen}.pt" if screened else "best.pt")
    f = cli("finetune", "--study", study, "--runs", a.runs, "--weights", weights, "--epochs",
            a.epochs, "--distill", "--lr", a.lr, "--seed", seed, "--quiet", "--json",
            "--out", ckpt, *(["--screen", a.screen, "--screen-epochs", a.screen_epochs,
                              "--tables", a.tables or ROOT / "latency_tables"]
                             if screened else []))
    if f.returncode != 0:
        return {"method": method, "study": study, "error": f.stderr.strip()}
    finetune_s = time.perf_counter() - t0
    if f.stdout.startswith("already fine-tuned"):
        screen = torch_extra(ckpt).get("screen")
    else:
        screen = json.loads(f.stdout).get("screen")
    e = cli("export", "--study", study, "--runs", a.runs, "--weights", weights, "--format",
            "onnx", "--json", "--rounds", a.rounds, "--checkpoint", ckpt, "--out",
            Path(a.runs) / study / ("export-" + ckpt.stem if screened else "export"))
    if e.returncode != 0:
        return {"method": method, "study": study, "error": e.stderr.strip()}
    r = json.loads(e.stdout)
    return {"method": f"{method}+screen{a.screen}" if screened else method, "study": study,
            # the searched budget in predicted ms = the table's x this (None: table trusted)
            "budget_check_scale": r["speedup"].get("check_scale"),
            "test_acc_before_finetune": r["pruned"]["test_acc_before_finetune"],
            "test_acc": r["pruned"]["test_acc_after_finetune"],
            "unpruned_test_acc": r["unpruned"]["test_acc"],
            "measured_ms": r["pruned"]["latency"], "unpruned_measured_ms": r["unpruned"]["latency"],
            "speedup_measured": r["speedup"]["measured"],
            "speedup_predicted": r["speedup"]["predicted"],
            "speedup_error_pct": r["speedup"]["error_pct"],
            # the table's prediction x the budget check's scale: the study's own prediction
            "speedup_predicted_checked": r["speedup"].get("predicted_checked"),
            "speedup_error_pct_checked": r["speedup"].get("error_pct_checked"),
            "measured_fraction": r["budget"]["measured_fraction"],
            "macs": r["pruned"]["macs"], "params": r["pruned"]["params"],
            "policy": r["policy"], "search_s": search_s, "finetune_s": finetune_s,
            "screen": screen}


def torch_extra(ckpt: Path) -> dict:
    """The ``extra`` of an autoprune checkpoint (what its fine-tune recorded)."""
    import torch

    return torch.load(ckpt, map_location="cpu", weights_only=True).get("extra") or {}


def run_tp_global(weights, budget, seed, a) -> dict:
    """Torch-Pruning's global magnitude pruning, ratio bisected to the measured budget."""
    import torch
    import torch_pruning as tp

    from autoprune.count import count_macs, count_params
    from autoprune.data import load_dataset
    from autoprune.evaluate import recalibrate_bn
    from autoprune.latency.backends import get_backend
    from autoprune.latency.devices import get_device
    from autoprune.models import ModelSpec, build_model, load_state, read_checkpoint
    from autoprune.report import measure_pair
    from autoprune.train import TrainConfig, evaluate, train

    torch.set_num_threads(a.threads)
    ckpt = read_checkpoint(weights)
    base = build_model(ModelSpec.from_dict(ckpt["model"]))
    load_state(base, ckpt["state_dict"], source=str(weights))
    base.eval()
    shape = tuple(ckpt["input_shape"])
    data = load_dataset(ckpt["data"])
    device = get_device(a.device)
    multiple = a.round_to or device.channel_multiple

    def prune(ratio):
        m = copy.deepcopy(base)
        classifier = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)][-1]
        # fresh dicts: BasePruner's dict defaults are shared mutable objects
        pruner = tp.pruner.MagnitudePruner(
            m, torch.zeros(shape), importance=tp.importance.GroupMagnitudeImportance(p=1),
            global_pruning=True, pruning_ratio=ratio, max_pruning_ratio=0.9,
            ignored_layers=[classifier], round_to=multiple, in_channel_groups={},
            out_channel_groups={}, num_heads={}, channel_groups={})
        with torch.enable_grad():
            pruner.step()
        return m.eval()

    t0 = time.perf_counter()
    with get_backend(device) as backend:
        full = statistics.median(backend.measure_model(base, shape).median_ms for _ in range(3))
        target = budget * full
        # Measured latency is not monotone in torch-pruning's global ratio (global ranking
        # moves channels between stages; a ratio past what it can prune leaves the model
        # whole), so bisection misleads: scan the ratios and keep the least pruning that fits.
        best = None
        for i in range(1, a.scan_steps + 1):
            ratio = round(0.9 * i / a.scan_steps, 4)
            ms = backend.measure_model(prune(ratio), shape).median_ms
            log(f"tp-global ratio {ratio:.4f}: {ms:.4f} ms (target {target:.4f})")
            if ms <= target:
                best = ratio
                break
        if best is None:
            return {"method": "tp-global", "error": f"no ratio <= 0.9 meets {budget} measured"}
        model = prune(best)
        search_s = time.perf_counter() - t0
        recalibrate_bn(model, data.train, batches=10, batch_size=128, seed=seed)
        before = evaluate(model, data.test)
        t0 = time.perf_counter()
        train(model, data, TrainConfig(epochs=a.epochs, lr=a.lr, seed=seed, kd_alpha=0.9,
                                       kd_temperature=4.0), teacher=base)
        model.eval()
        finetune_s = time.perf_counter() - t0
        lat_u, lat_p = measure_pair(backend, base, model, shape, rounds=a.rounds)
    x = torch.zeros(shape)
    return {"method": "tp-global", "pruning_ratio": best, "test_acc_before_finetune": before,
            "test_acc": evaluate(model, data.test), "unpruned_test_acc": evaluate(base, data.test),
            "measured_ms": lat_p, "unpruned_measured_ms": lat_u,
            "speedup_measured": lat_u["median_ms"] / lat_p["median_ms"],
            "measured_fraction": lat_p["median_ms"] / lat_u["median_ms"],
            "macs": count_macs(model, x), "params": count_params(model),
            "channels": {n: m.out_channels for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Conv2d)},
            "search_s": search_s, "finetune_s": finetune_s}


ORDER = {"evolution": 0, "amc": 1, "uniform": 2, "tp-global": 3}  # a screened one beside its own


def _rows(results):
    """``(model@budget, rows)`` in the order of the runs, each group's rows by method then seed."""
    groups = {}
    for r in results:
        groups.setdefault(f"{r['model']}@{r['budget']:g}", []).append(r)
    for key, rs in groups.items():
        yield key, sorted(rs, key=lambda r: (ORDER.get(r.get("method", "").split("+")[0], 9),
                                             r.get("method", ""), r.get("seed", 0)))


def _checked(r) -> tuple[float, float] | None:
    """The speedup the study predicted after its budget check, and its error in % (from the
    scale where an output predates the field)."""
    pred, scale = r.get("speedup_predicted"), r.get("budget_check_scale")
    if not (pred and scale):
        return None
    checked = r.get("speedup_predicted_checked") or pred * scale
    return checked, (checked - r["speedup_measured"]) / r["speedup_measured"] * 100


def table(results) -> str:
    """The results as Markdown, one table per model and budget (as bench/README.md shows them)."""
    out = []
    for key, rs in _rows(results):
        out += [f"**{key}**", "",
                "| method | seed | test acc before → after fine-tune | measured pruned / "
                "unpruned ms (fraction) | speedup measured (table's prediction), off; the "
                "prediction after the budget check, off | budget check |",
                "|---|---|---|---|---|---|"]
        for r in rs:
            head = f"| {r.get('method', '?')} | {r.get('seed', '–')} |"
            if "test_acc" not in r:
                why = r.get("skipped") or r.get("error") or "?"
                out.append(f"{head} {why.splitlines()[-1]} | | | | |")
                continue
            pred, scale = r.get("speedup_predicted"), r.get("budget_check_scale")
            speed = f"{r['speedup_measured']:.2f}x (" + \
                (f"{pred:.2f}x), {abs(r['speedup_error_pct']):.1f}%" if pred else
                 "no predictor)")
            checked = _checked(r)
            if checked:
                speed += f"; checked {checked[0]:.2f}x, {abs(checked[1]):.1f}%"
            pruned, full = r["measured_ms"]["median_ms"], r["unpruned_measured_ms"]["median_ms"]
            out.append(
                f"{head} {r['test_acc_before_finetune']:.2%} → {r['test_acc']:.2%} | "
                f"{pruned:.4f} / {full:.4f} ({r['measured_fraction']:.3f}) | {speed} | "
                f"{f'x{scale:.3f}' if scale else '–'} |")
        out.append("")
    return "\n".join(out)


def plot(results, path: Path) -> Path | None:
    """Test accuracy after fine-tune against measured latency (a fraction of the unpruned
    model's), one panel per model and budget."""
    from _output import panels

    groups = []
    for key, rs in _rows(results):
        by = {}
        for r in rs:
            if "test_acc" in r:
                by.setdefault(r["method"], []).append((r["measured_fraction"],
                                                       r["test_acc"] * 100))
        groups.append((key, rs[0]["budget"], by))
    return panels(groups, path, xlabel="measured latency / unpruned",
                  ylabel="test accuracy after fine-tune (%)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet20,resnet56")
    p.add_argument("--budgets", default="0.5,0.3")
    p.add_argument("--methods", default="amc,evolution,uniform,tp-global")
    p.add_argument("--seeds", default="0")
    p.add_argument("--weights", action="append", default=[], metavar="MODEL=PATH",
                   help="trained checkpoint of a model (resnet20 defaults to the shipped one)")
    p.add_argument("--device", default="cpu-ort")
    p.add_argument("--trials", type=int, default=300)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--round-to", type=int, help="channel multiple (default: the device's)")
    p.add_argument("--tables", help="latency tables folder (a finer --round-to grid adds "
                   "entries: point this at a copy to leave latency_tables/ as shipped)")
    p.add_argument("--rounds", type=int, default=5, help="alternating measurement rounds")
    p.add_argument("--scan-steps", type=int, default=36,
                   help="tp-global: pruning ratios tried, evenly up to 0.9")
    p.add_argument("--screen", type=int, default=1, metavar="K",
                   help="amc, evolution: `finetune --screen K` (short fine-tunes of the top K "
                   "distinct candidates that fit, then the best in full); 1: the study's best")
    p.add_argument("--screen-epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", default=str(ROOT / "runs" / "bench-e2e"))
    p.add_argument("--plot", help="where the plot goes (default: end_to_end.png in --runs)")
    p.add_argument("--render", metavar="JSON", nargs="+",
                   help="run nothing: print the table of earlier runs' JSON outputs (one or "
                   "more, merged) and write their plot (default: beside the first)")
    a = p.parse_args()
    if a.render:
        from _output import render

        return render(a.render, "results", "end_to_end.py", table, plot, a.plot)
    weights = dict(SHIPPED)
    for w in a.weights:
        name, _, path = w.partition("=")
        weights[name] = Path(path)
    from autoprune.progress import bar

    results = []
    models, methods = a.models.split(","), a.methods.split(",")
    budgets = [float(b) for b in a.budgets.split(",")]
    seeds = [int(s) for s in a.seeds.split(",")]
    with bar("end_to_end", len(models) * len(budgets) * len(seeds) * len(methods),
             enabled=True, fields="{task.fields[last]}") as progress:
        for model in models:
            for budget in budgets:
                for seed in seeds:
                    w = weights.get(model)
                    if w is None or not Path(w).is_file():
                        results.append({"model": model, "budget": budget, "seed": seed,
                                        "skipped": f"no trained {model} checkpoint; train one "
                                        f"with `autoprune train --model {model} --epochs 30 "
                                        f"--out {model}.pt` and pass --weights "
                                        f"{model}={model}.pt"})
                        progress.advance(len(methods), last=f"{model}: skipped")
                        continue
                    for method in methods:
                        r = run_tp_global(w, budget, seed, a) if method == "tp-global" else \
                            run_searched(method, w, budget, seed, a)
                        results.append({"model": model, "budget": budget, "seed": seed, **r})
                        log(json.dumps({k: v for k, v in results[-1].items()
                                        if k not in ("policy", "channels")}))
                        done = f"{r['test_acc']:.2%}" if "test_acc" in r else "failed"
                        progress.advance(last=f"{model}@{budget:g} {method} s{seed}: {done}")
    summary = {}
    for r in results:
        if "test_acc" not in r:
            continue
        key = f"{r['model']}@{r['budget']:g}"
        summary.setdefault(key, {}).setdefault(r["method"], []).append(r)
    checks = {}
    for key, by in summary.items():
        mean = {m: statistics.mean(x["test_acc"] for x in rs) for m, rs in by.items()}
        c = {"mean_test_acc": mean}
        for m in (m for m in mean if m.split("+")[0] in ("amc", "evolution")):
            if "uniform" in mean:
                c[f"{m}_beats_uniform_by_0.3pt"] = mean[m] >= mean["uniform"] + 0.003
            if m in mean and "tp-global" in mean:
                c[f"{m}_beats_tp_global"] = mean[m] >= mean["tp-global"]
        errs = [abs(x["speedup_error_pct"]) for rs in by.values() for x in rs
                if x.get("speedup_error_pct") is not None]
        if errs:  # against the table's prediction
            c["max_abs_speedup_error_pct"] = max(errs)
            c["speedup_within_5pct_of_predicted"] = max(errs) <= 5.0
        errs = [abs(_checked(x)[1]) for rs in by.values() for x in rs if _checked(x)]
        if errs:  # against the study's, after its budget check
            c["max_abs_speedup_error_pct_checked"] = max(errs)
            c["speedup_within_5pct_of_checked_prediction"] = max(errs) <= 5.0
        # A busy spell of a shared machine shows as a wide IQR (the median of the rounds' IQRs;
        # seen: amc's winner at 0.2593 ms, IQR 9% of it, then 0.1844 ms, IQR 0.9%, re-run);
        # re-running the same command measures again (the searched methods keep their studies
        # and fine-tunes; tp-global is done again).
        # A spell that outlasts the added rounds leaves the median round slow (`settled`).
        noisy = [f"{m} seed {x['seed']}" for m, rs in by.items() for x in rs
                 if any(x[k]["iqr_ms"] > NOISY_IQR * x[k]["median_ms"]
                        or not x[k].get("settled", True)
                        for k in ("measured_ms", "unpruned_measured_ms"))]
        c["noisy_measurements"] = noisy
        if noisy:
            log(f"{key}: latency IQR over {NOISY_IQR:.0%} of the median, or rounds that never "
                f"settled, for "
                f"{', '.join(noisy)}: the machine was busy; run the same command again to "
                "measure again")
        checks[key] = c
    where = plot(results, Path(a.plot) if a.plot else ROOT / a.runs / "end_to_end.png")
    if where:
        log(f"plot: {where}")
    print("\n" + table(results), file=sys.stderr)
    print(json.dumps({"command": " ".join(sys.argv), "config": vars(a), "results": results,
                      "checks": checks, "plot": str(where) if where else None}, indent=2,
                     default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
