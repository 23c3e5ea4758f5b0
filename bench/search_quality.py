"""Search quality: amc and evolution against uniform and random, at the same number of
evaluated candidates, on the shipped ResNet-20 / Fashion-MNIST and a target device. Prints one
JSON document.

    python bench/search_quality.py                                   # the full benchmark
    python bench/search_quality.py --trials 60 --seeds 0 --budgets 0.5

For every (budget, searcher, seed): val accuracy of the winner (no fine-tuning), its predicted
and *measured* latency on the device, seconds per candidate evaluation, and the searcher's own
overhead as a share of wall time, and whether the winner is one of the seeds that evolution
and amc start from (``winner_seed``: its index in `seed_policies`, 0 the uniform one, or
null). The winner is chosen as `autoprune search` chooses it: the
most accurate feasible candidate that also measures within 1.05 x budget on the device (the
best predicted ones are measured in turn, at most --verify-top; `best_predicted_val_acc` is
the winner by prediction alone). The measured check's time is reported apart (`verify_s`).

A progress bar (in a log file, a line every 15 s) counts candidates on stderr; at the end a
Markdown table per budget goes to stderr and a plot of the winners (val accuracy against
measured latency) to ``search_quality.png`` (``--plot``). ``--render OUT.json ...`` prints the
tables and draws the plot of earlier runs' JSON outputs without running anything.

Targets (issue 4): both searchers beat uniform and random at both budgets (mean over seeds);
measured latency <= 1.05 x budget for every winner; one evaluation <= 1.5 s; searcher overhead
<= 5% of wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autoprune.data import load_dataset  # noqa: E402
from autoprune.evaluate import (  # noqa: E402
    VERIFY_SECONDS,
    Evaluator,
    budget_measurer,
    check_budget,
    first_measured_fit,
    near_budget_policies,
    policy_key,
    ranked,
    resolve_budget,
    watched_measurer,
)
from autoprune.latency.backends import get_backend  # noqa: E402
from autoprune.latency.devices import get_device  # noqa: E402
from autoprune.latency.profile import build_table, measure_pruned, model_key  # noqa: E402
from autoprune.latency.table import table_path  # noqa: E402
from autoprune.models import ModelSpec, build_model, load_state, read_checkpoint  # noqa: E402
from autoprune.progress import bar  # noqa: E402
from autoprune.search import SEARCHERS, SearchContext  # noqa: E402
from autoprune.space import SearchSpace, SpaceSpec  # noqa: E402

WEIGHTS = Path(__file__).resolve().parent.parent / "autoprune" / "weights" / \
    "resnet20-fashion-mnist.pt"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=str(WEIGHTS))
    ap.add_argument("--device", default="cpu-ort")
    ap.add_argument("--budgets", default="0.5,0.3")
    ap.add_argument("--searchers", default="amc,evolution,random,uniform")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--trials", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2, help="PyTorch threads for evaluation")
    ap.add_argument("--round-to", type=int,
                    help="channel multiple (default: the device's; budget 0.3 on cpu-ort needs 4)")
    ap.add_argument("--tables", help="latency tables folder (a finer grid adds entries: point "
                    "this at a copy to leave latency_tables/ as shipped)")
    ap.add_argument("--budget-check", type=int, default=8, metavar="K",
                    help="before each search, measure K policies the table puts at the budget "
                    "and search to the budget they say, as `autoprune search` does (0: the "
                    "table's budget)")
    ap.add_argument("--verify-top", type=int, default=10,
                    help="measure at most this many of the best candidates (0: winner by "
                    "prediction alone)")
    ap.add_argument("--verify-seconds", type=float, default=VERIFY_SECONDS,
                    help="the measured check watches the machine's state this long at least, "
                    "as `autoprune search --verify-seconds` does")
    ap.add_argument("--amc-warmup", type=int, help="amc's random warm-up episodes "
                    "(default: the searcher's)")
    ap.add_argument("--amc-action", choices=["bounds", "wall", "share", "reach"],
                    help="amc's action range (default: the searcher's)")
    ap.add_argument("--amc-actor-reg", type=float,
                    help="amc's penalty on the actor's pre-tanh activation (default: the "
                    "searcher's)")
    ap.add_argument("--amc-repeats", choices=["move", "replay"],
                    help="amc's episodes that repeat a policy: evaluate a new neighbour, or "
                    "serve it from the cache as AMC does (default: the searcher's)")
    ap.add_argument("--amc-warmup-policies", choices=["seeds", "random"],
                    help="amc's first episodes: evolution's seeds, or random (default: the "
                    "searcher's)")
    ap.add_argument("--amc-update-ratio", type=float,
                    help="amc's gradient steps after each episode, per group (default: the "
                    "searcher's)")
    ap.add_argument("--amc-update", choices=["hand", "autograd"], default="hand",
                    help="amc's DDPG update: the hand-written one it runs, or the same update "
                    "through autograd (its reference, to time the difference in a search)")
    ap.add_argument("--keep", help="write each run's candidates (JSON lines) and the measured "
                    "check's measurements under this folder, to look into a winner afterwards")
    ap.add_argument("--plot", help="where the plot goes (default: search_quality.png in the "
                    "current folder)")
    ap.add_argument("--render", metavar="JSON", nargs="+",
                    help="run nothing: print the tables of earlier runs' JSON outputs (one or "
                    "more, merged) and write their plot (default: beside the first)")
    args = ap.parse_args()
    if args.render:
        from _output import render

        return render(args.render, "runs", "search_quality.py", table, plot, args.plot)
    torch.set_num_threads(args.threads)
    if args.amc_update == "autograd":
        from autoprune.search.amc import make_agent_class

        cls = make_agent_class()
        cls._train = cls._train_autograd

    ckpt = read_checkpoint(args.weights)
    spec = ModelSpec.from_dict(ckpt["model"])
    model = build_model(spec)
    load_state(model, ckpt["state_dict"], source=args.weights)
    model.eval()
    data = load_dataset(ckpt["data"])
    device = get_device(args.device)
    x = torch.zeros(data.input_shape)
    space = SearchSpace.from_model(model, x, SpaceSpec.for_family(spec.family),
                                   family=spec.family,
                                   round_to=args.round_to or device.channel_multiple,
                                   coupled_round_to=device.channel_multiple)
    out = {"model": spec.name, "data": ckpt["data"], "device": device.name,
           "trials": args.trials, "amc_update": args.amc_update, "runs": []}
    with get_backend(device) as backend:
        setup = build_table(model, space, device, backend,
                            key=model_key(spec.name, tuple(x.shape)), model_name=spec.name,
                            path=table_path(device.name, spec.name,
                                            Path(args.tables) if args.tables else None))
        pred = setup.predictor()
        full_measured = measure_pruned(backend, model, space.full(), space)[0].median_ms
        out["unpruned"] = {"predicted_ms": pred.max_latency(), "measured_ms": full_measured,
                           "smallest_predicted_fraction": pred.min_latency() /
                           pred.max_latency()}
        budgets = [float(b) for b in args.budgets.split(",")]
        names, seeds = args.searchers.split(","), [int(s) for s in args.seeds.split(",")]
        with bar("search_quality", len(budgets) * len(names) * len(seeds) * args.trials,
                 enabled=True, fields="{task.fields[run]}") as progress:
            for budget_f in budgets:
                budget_ms = resolve_budget(pred, fraction=budget_f)
                for name in names:
                    for seed in seeds:
                        options = {"population": 32} if name == "evolution" else {}
                        if name == "amc":
                            options.update({k: v for k, v in (
                                ("warmup_episodes", args.amc_warmup), ("action", args.amc_action),
                                ("actor_reg", args.amc_actor_reg), ("repeats", args.amc_repeats),
                                ("update_ratio", args.amc_update_ratio),
                                ("warmup_policies", args.amc_warmup_policies))
                                if v is not None})
                        progress.update(run=f"{name} b{budget_f:g} s{seed}")
                        out["runs"].append(_run(name, seed, budget_f, budget_ms, model, data,
                                                space, pred, backend, args.trials, options,
                                                args.verify_top, args.keep, args.budget_check,
                                                progress, args.verify_seconds))
                        print(json.dumps(out["runs"][-1]), file=sys.stderr, flush=True)
    out["summary"] = _summarise(out["runs"])
    where = plot(out["runs"], Path(args.plot or "search_quality.png"))
    out["plot"] = str(where) if where else None
    print("\n" + table(out["runs"]), file=sys.stderr)
    print(json.dumps(out, indent=2))
    return 0


def table(runs) -> str:
    """Per budget: each searcher's figures from `_summarise` and its seeds' winners, as
    Markdown."""
    out = []
    for budget, row in sorted(_summarise(runs).items(), key=lambda kv: -float(kv[0])):
        out += [f"**budget {float(budget):g}**", "",
                "| searcher | mean val acc | per seed | measured / budget (max) | overhead | "
                "episodes (moved) |", "|---|---|---|---|---|---|"]
        for name, s in sorted(row.items(), key=lambda kv: -kv[1]["mean_val_acc"]):
            rs = sorted((r for r in runs if str(r["budget"]) == budget and r["searcher"] == name),
                        key=lambda r: r["seed"])
            seeds = ", ".join(f"{r['best_val_acc']:.2%}" for r in rs)
            eps = ", ".join(f"{r['episodes']} ({r['episodes_moved'] or 0})" for r in rs
                            if r.get("episodes") is not None) or "–"
            out.append(f"| {name} | {s['mean_val_acc']:.2%} | {seeds} | "
                       f"{s['max_measured_over_budget']:.3f} | {s['mean_overhead_pct']:.1f}% | "
                       f"{eps} |")
        out.append("")
    return "\n".join(out)


def plot(runs, path: Path) -> Path | None:
    """Each winner's val accuracy against its measured latency (a fraction of the unpruned
    model's), one panel per budget."""
    from _output import panels

    groups = []
    for budget in sorted({r["budget"] for r in runs}, reverse=True):
        by = {}
        for r in runs:
            if r["budget"] == budget:
                by.setdefault(r["searcher"], []).append(
                    (r["measured_ms"] / r["measured_unpruned_ms"], r["best_val_acc"] * 100))
        groups.append((f"budget {budget:g}", budget, by))
    return panels(groups, path, xlabel="winner's measured latency / unpruned",
                  ylabel="winner's val accuracy, no fine-tune (%)")


def _run(name, seed, budget_f, budget_ms, model, data, space, pred, backend, trials, options,
         verify_top, keep=None, budget_check=0, progress=None, verify_seconds=VERIFY_SECONDS):
    check = None
    if budget_check:  # as `autoprune search` does before a new study's search
        t0 = time.perf_counter()
        check = check_budget(near_budget_policies(space, pred, budget_ms, budget_check,
                                                  seed=seed),
                             pred, budget_ms, budget_measurer(backend, model, space,
                                                              fraction=budget_f),
                             floor_ms=pred.min_latency())
        check = {**check.to_dict(), "seconds": time.perf_counter() - t0}
        budget_ms *= check["scale"]
    ev = Evaluator(model, data, space, pred, budget_ms=budget_ms, seed=seed)
    searcher = SEARCHERS[name]()(space, pred, budget_ms, seed=seed, **options)
    found = []

    def found_one(candidate):
        found.append(candidate)
        if progress:
            progress.advance()

    with tempfile.TemporaryDirectory() as tmp:
        ctx = SearchContext(evaluate=lambda p, t: ev.evaluate(p, searcher=name, trial=t),
                            n_trials=trials, seed=seed, state_dir=Path(tmp) / "amc",
                            storage_url=f"sqlite:///{tmp}/optuna.db", study_name="bench",
                            on_candidate=found_one, known=lambda p: p in ev.cache)
        t0 = time.perf_counter()
        searcher.run(ctx)
        wall = time.perf_counter() - t0
        if progress:  # uniform's ladder (or a stalled amc) stops short of the trials
            progress.advance(max(0, trials - len(found)))
        # amc: episodes run (some repeated a policy: served from the cache, or moved to a new
        # neighbour, ``moved``, with ``--amc-repeats move``)
        # and its updates: how many ran on each thread count, and their seconds
        episodes = moved = update_counts = update_s = None
        latest = Path(tmp) / "amc" / "latest.json"
        if latest.is_file():
            ckpt = Path(tmp) / "amc" / json.loads(latest.read_text())["dir"]
            state = json.loads((ckpt / "state.json").read_text())
            episodes, moved = state["episodes_done"], state.get("episodes_moved")
            update_counts, update_s = state.get("update_counts"), state.get("update_s")
    cands = list(ev.cache.values())
    eval_s = [c.eval_s for c in cands]
    seeds = searcher.seeds()  # evolution's and amc's at this budget: is the winner one?
    # each the quickest of three passes (one pass can catch a spike of this shared machine:
    # seen here, 0.399 ms once for a policy that measures 0.271-0.275 ms), alternating with
    # the unpruned model, whose latency the budget is a fraction of, and watched over
    # ``verify_seconds`` for the machine's slow state, as `autoprune search` does
    known: dict[str, dict] = {}
    measure = watched_measurer(budget_measurer(backend, model, space, fraction=budget_f),
                               seconds=verify_seconds)
    t0 = time.perf_counter()
    predicted_best = ranked(cands)[0]
    best = first_measured_fit(cands, measure, tolerance=0.05, top=verify_top,
                              known=known) if verify_top else None
    best = best or predicted_best
    rec = known.get(policy_key(best.policy)) or measure(best.policy)
    verify_s = time.perf_counter() - t0
    if keep:
        folder = Path(keep) / f"{name}-b{budget_f:g}-s{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "candidates.jsonl").write_text("".join(c.to_json() + "\n" for c in cands))
        (folder / "measured.json").write_text(json.dumps(known, indent=1))
    return {"budget": budget_f, "searcher": name, "seed": seed, "options": options,
            "budget_check": check, "searched_budget_ms": budget_ms,
            "evaluated": len(cands), "episodes": episodes, "episodes_moved": moved,
            "update_counts": update_counts, "update_s": update_s,
            "best_val_acc": best.val_acc, "predicted_ms": best.latency_ms,
            "winner_seed": seeds.index(best.policy) if best.policy in seeds else None,
            "best_predicted_val_acc": predicted_best.val_acc,
            "verify_measured": len(known), "verify_s": verify_s,
            "measured_ms": rec["median_ms"], "measured_unpruned_ms": rec["reference_ms"],
            "measured_over_budget": rec["over_budget"],
            "eval_s_median": statistics.median(eval_s), "eval_s_max": max(eval_s),
            "wall_s": wall, "searcher_overhead_pct": max(0.0, wall - sum(eval_s)) / wall * 100,
            "policy": best.policy.to_dict()}


def _summarise(runs):
    out = {}
    for budget in sorted({r["budget"] for r in runs}):
        row = {}
        for name in sorted({r["searcher"] for r in runs}):
            rs = [r for r in runs if r["budget"] == budget and r["searcher"] == name]
            row[name] = {"mean_val_acc": statistics.mean(r["best_val_acc"] for r in rs),
                         "mean_best_predicted_val_acc":
                             statistics.mean(r["best_predicted_val_acc"] for r in rs),
                         "max_measured_over_budget": max(r["measured_over_budget"] for r in rs),
                         "mean_overhead_pct": statistics.mean(r["searcher_overhead_pct"]
                                                              for r in rs)}
        # None unless this run had both baselines to compare with
        baselines = [row[b]["mean_val_acc"] for b in ("uniform", "random") if b in row]
        for name in ("amc", "evolution"):
            if name in row:
                row[name]["beats_uniform_and_random"] = \
                    row[name]["mean_val_acc"] > max(baselines) if len(baselines) == 2 else None
        out[str(budget)] = row
    return out


if __name__ == "__main__":
    sys.exit(main())
