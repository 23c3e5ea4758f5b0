"""The measured check that ends a search, repeated on a finished study: which candidate it
picks when it watches the machine's state (`autoprune search`'s default, ``--verify-seconds``
10) and when it measures each candidate once (``--verify-seconds 0``, the check before).
Prints one JSON document, a Markdown table on stderr and, with ``--plot``, a PNG.

    python bench/measured_check.py --study demo [--runs runs] [--repeats 6] [--plot PATH]

Each repeat runs `evaluate.first_measured_fit` over the study's candidates both ways, one after
the other (the order alternating between repeats), from nothing measured, as a fresh search
would. Every single measurement the two ways make (a policy and the unpruned model beside it,
`budget_measurer`) is kept. The truth they are judged against is taken from all of them: a
policy's latency over the budget is its quickest measurement whose unpruned reference ran
within 5% of the quickest reference of the whole run, over the budget's fraction of that
reference; the true winner is the most accurate candidate whose truth is within the budget
x 1.05. A way errs when its winner is a less accurate candidate than that (it passed the true
winner over: accuracy lost for nothing) or a candidate whose truth is over the budget x 1.05
(it let one through that does not fit).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WAYS = {"watched": "watched (--verify-seconds {s:g})", "once": "once (--verify-seconds 0)"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", required=True, help="a study with a finished search")
    ap.add_argument("--runs", default="runs", help="the runs folder the study is in")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=None,
                    help="the watched way's --verify-seconds (default: the search's, 10)")
    ap.add_argument("--top", type=int, default=10, help="--verify-top, as the search's default")
    ap.add_argument("--tolerance", type=float, default=0.05, help="--verify-tolerance")
    ap.add_argument("--plot", help="a PNG of each repeat's winner, both ways")
    a = ap.parse_args()
    if a.repeats < 1 or a.top < 1 or (a.seconds is not None and a.seconds < 0):
        print("measured_check.py: error: --repeats and --top must be >= 1, --seconds >= 0",
              file=sys.stderr)
        return 2

    import torch

    from autoprune import cli
    from autoprune.errors import UserError
    from autoprune.evaluate import (
        BUDGET_CHECK_QUIET,
        VERIFY_SECONDS,
        _over,
        _quiet,
        _quietest_reference,
        budget_measurer,
        first_measured_fit,
        policy_key,
        ranked,
        watched_measurer,
    )
    from autoprune.latency.backends import get_backend

    seconds = VERIFY_SECONDS if a.seconds is None else a.seconds
    torch.set_num_threads(1)
    try:
        study = cli._open_finished(SimpleNamespace(runs=a.runs, study=a.study))
        base = cli._study_base(study, SimpleNamespace(weights=None))
        device = cli._study_device(study)
        cfg = study.config
        if "fraction" not in cfg["budget"]:
            raise UserError(f"study {a.study!r} has a budget in ms: no unpruned reference to "
                            "watch the machine by; pick a study searched with --latency-budget")
        space = cli._build_space(base, SimpleNamespace(space=None,
                                                       round_to=cfg["space"]["round_to"]),
                                 coupled_round_to=device.channel_multiple)
        backend = get_backend(device)
    except UserError as e:
        print(f"measured_check.py: error: {e}", file=sys.stderr)
        return 2
    fraction = cfg["budget"]["fraction"]
    order = ranked(study.candidates)
    rank = {policy_key(c.policy): i for i, c in enumerate(order)}
    raw: list[tuple[str, dict]] = []  # every single measurement, both ways

    def logged(measure):
        def m(policy):
            rec = measure(policy)
            raw.append((policy_key(policy), rec))
            return rec
        return m

    picks = []
    with backend:
        for i in range(a.repeats):
            ways = list(WAYS) if i % 2 == 0 else list(WAYS)[::-1]
            for way in ways:
                t0 = time.perf_counter()
                measure = logged(budget_measurer(backend, base.model, space, fraction=fraction))
                known: dict[str, dict] = {}
                found = first_measured_fit(
                    study.candidates,
                    watched_measurer(measure, seconds=seconds if way == "watched" else 0.0),
                    tolerance=a.tolerance, top=a.top, known=known)
                k = policy_key(found.policy) if found else None
                picks.append({"repeat": i, "way": way, "winner_rank": rank.get(k),
                              "winner_val_acc": found.val_acc if found else None,
                              "over_budget": known[k]["over_budget"] if k else None,
                              "measured": len(known), "seconds": time.perf_counter() - t0})
                print(f"repeat {i} {way}: winner #{rank.get(k)} in {picks[-1]['seconds']:.1f} s "
                      f"({len(known)} candidates measured)", file=sys.stderr, flush=True)

    quickest = _quietest_reference([[r for _, r in raw]])
    calm = [(k, r) for k, r in raw if _quiet(r, quickest)]
    truth: dict[str, float] = {}
    for k, r in calm:  # over the budget as a fraction of the run's quickest reference
        truth[k] = min(truth.get(k, float("inf")), _over(r, quickest))
    true_rank = next((rank[policy_key(c.policy)] for c in order
                      if truth.get(policy_key(c.policy), float("inf")) <= 1 + a.tolerance), None)
    for p in picks:
        k = None if p["winner_rank"] is None else policy_key(order[p["winner_rank"]].policy)
        p["true_over_budget"] = truth.get(k)
        p["passed_over_true_winner"] = p["winner_rank"] is None or (
            true_rank is not None and p["winner_rank"] > true_rank)
        p["let_through"] = k is not None and truth.get(k, 0.0) > 1 + a.tolerance

    def summary(way: str) -> dict:
        ps = [p for p in picks if p["way"] == way]
        accs = [p["winner_val_acc"] for p in ps if p["winner_val_acc"] is not None]
        return {"true_winner_picked": sum(p["winner_rank"] == true_rank for p in ps) / len(ps),
                "passed_over": sum(p["passed_over_true_winner"] for p in ps),
                "let_through": sum(p["let_through"] for p in ps),
                "mean_winner_val_acc": statistics.mean(accs) if accs else None,
                "median_seconds": statistics.median(p["seconds"] for p in ps),
                "median_measured": statistics.median(p["measured"] for p in ps)}

    out = {"study": a.study, "device": device.name, "budget_fraction": fraction,
           "repeats": a.repeats, "verify_seconds": seconds, "top": a.top,
           "tolerance": a.tolerance, "candidates": len(order),
           "true_winner": None if true_rank is None else {
               "rank": true_rank, "val_acc": order[true_rank].val_acc,
               "over_budget": truth[policy_key(order[true_rank].policy)]},
           "quickest_reference_ms": quickest, "measurements": len(raw),
           "quiet_share": len(calm) / len(raw),
           "summary": {way: summary(way) for way in WAYS}, "picks": picks}
    print("\n**The measured check, repeated: its winner against the true one**\n\n"
          "| way | true winner picked | passed it over | let one over through | "
          "mean winner val acc | median s |\n|---|---|---|---|---|---|", file=sys.stderr)
    for way, name in WAYS.items():
        s = out["summary"][way]
        acc = "-" if s["mean_winner_val_acc"] is None else f"{s['mean_winner_val_acc']:.2%}"
        print(f"| {name.format(s=seconds)} | {s['true_winner_picked']:.0%} | {s['passed_over']} "
              f"| {s['let_through']} | {acc} | {s['median_seconds']:.1f} |", file=sys.stderr)
    print(f"\n{len(raw)} measurements, {out['quiet_share']:.0%} of them quiet (the unpruned "
          f"model within {BUDGET_CHECK_QUIET:.0%} of its quickest, {quickest:.4f} ms); true "
          f"winner: #{true_rank}", file=sys.stderr)
    if a.plot:
        from _output import per_item_plot

        out["plot"] = per_item_plot(
            a.plot, {WAYS[w].format(s=seconds): [float("nan") if p["winner_rank"] is None
                                                 else p["winner_rank"]
                                                 for p in picks if p["way"] == w]
                     for w in WAYS},
            hlines={} if true_rank is None else {true_rank: "the true winner"},
            xlabel="repeat", ylabel="winner's rank (0: the most accurate candidate)",
            title=f"Measured check of study {a.study} on {device.name}", from_zero=True)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
