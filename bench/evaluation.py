"""One candidate evaluation (the search's score of a policy): seconds for its adaptive BN pass and
its accuracy pass, run one batch at a time on ``--threads`` intra-op threads against
``--threads`` batches at a time on one thread each (`autoprune.threads.split_forward`, what the
evaluator does). Prints one JSON document, a Markdown table on stderr and, with ``--plot``, a
PNG.

    python bench/evaluation.py [--policies 16] [--keep 0.3:0.7] [--threads 2] [--load N]
                               [--plot PATH]

The shipped ResNet-20 on Fashion-MNIST by default (``--weights`` for another checkpoint), the
evaluator's defaults: adaptive BN on 10 training batches of 128, accuracy on the first 2000
validation images in batches of 250. Each policy keeps, in every group, a fraction of its
channels drawn from ``--keep`` (rounded to the space's grid); it is pruned once and each way
scores its own copy, the two ways in alternating order. The JSON gives, per way, the median,
IQR and maximum of the seconds per evaluation (pruning excluded: the same for both), the
median ratio of the two on the same policy, and whether the two scored every policy alike.
``--load N`` keeps N other processes busy meanwhile (one thread each, multiplying matrices),
as on a machine whose cores something else takes in turns.
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
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _stats(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "iqr": q[2] - q[0], "max": max(xs), "runs": xs}


_BUSY = """
import torch
torch.set_num_threads(1)
x = torch.randn(256, 256)
while True:
    x = torch.tanh(x @ x)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", help="an autoprune checkpoint (default: the shipped ResNet-20)")
    ap.add_argument("--policies", type=int, default=16)
    ap.add_argument("--keep", default="0.3:0.7", metavar="LO:HI",
                    help="each group's kept fraction, drawn uniformly from [LO, HI]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--val-images", type=int, default=2000)
    ap.add_argument("--bn-batches", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", help="a PNG of each policy's seconds, both ways")
    ap.add_argument("--load", type=int, default=0, metavar="N",
                    help="N busy processes beside the evaluations")
    a = ap.parse_args()
    try:
        lo, hi = (float(v) for v in a.keep.split(":"))
        assert 0 < lo <= hi <= 1
    except (ValueError, AssertionError):
        print(f"evaluation: error: --keep {a.keep!r}: give LO:HI with 0 < LO <= HI <= 1, e.g. "
              "0.3:0.7", file=sys.stderr)
        return 2
    if a.threads < 2 or a.policies < 1 or a.load < 0:
        print("evaluation: error: --threads must be >= 2 (one thread has one way only), "
              "--policies >= 1 and --load >= 0", file=sys.stderr)
        return 2

    import numpy as np
    import torch

    from autoprune import cli
    from autoprune.errors import UserError
    from autoprune.evaluate import recalibrate_bn
    from autoprune.policy import Policy
    from autoprune.prune import apply_policy
    from autoprune.train import evaluate

    torch.set_num_threads(a.threads)
    args = SimpleNamespace(weights=a.weights, model=None, data=None, space=None, round_to=None)
    try:
        loaded = cli._resolve_model(args, need_weights=True)
        data = cli._load_data(loaded)
    except UserError as e:
        print(f"evaluation: error: {e}", file=sys.stderr)
        return 2
    space = cli._build_space(loaded, args)
    val = data.val.subset(a.val_images)
    example = torch.zeros(space.input_shape)
    rng = np.random.default_rng(a.seed)
    ways = {"one batch at a time": 1, "a batch a thread": a.threads}
    times: dict[str, list[float]] = {w: [] for w in ways}
    parts: dict[str, dict[str, list[float]]] = {w: {"bn": [], "accuracy": []} for w in ways}

    def score(i: int) -> bool:
        """Draw policy ``i``, score it both ways (in alternating order), record the seconds;
        whether the two ways scored it alike."""
        policy = Policy.from_dict({g.name: min(g.choices, key=lambda c, f=rng.uniform(lo, hi),
                                               g=g: abs(c - f * g.channels))
                                   for g in space.groups})
        pruned = apply_policy(loaded.model, policy, example_input=example)
        accs = {}
        for way in (list(ways) if i % 2 == 0 else list(ways)[::-1]):
            model = copy.deepcopy(pruned)
            t0 = time.perf_counter()
            recalibrate_bn(model, data.train, batches=a.bn_batches, batch_size=128,
                           workers=ways[way])
            t1 = time.perf_counter()
            accs[way] = evaluate(model, val, workers=ways[way])
            t2 = time.perf_counter()
            times[way].append(t2 - t0)
            parts[way]["bn"].append(t1 - t0)
            parts[way]["accuracy"].append(t2 - t1)
        print(f"policy {i}: " + ", ".join(f"{w} {times[w][-1]:.3f} s" for w in ways),
              file=sys.stderr, flush=True)
        return len(set(accs.values())) == 1

    alike = 0
    busy = [subprocess.Popen([sys.executable, "-c", _BUSY]) for _ in range(a.load)]
    try:
        for i in range(a.policies):
            alike += score(i)
    finally:
        for p in busy:
            p.kill()
            p.wait()

    one, many = (times[w] for w in ways)
    out = {"threads": a.threads, "policies": a.policies, "keep": [lo, hi], "load": a.load,
           "val_images": len(val), "bn_batches": a.bn_batches,
           "torch": torch.__version__,
           "seconds": {w: {**_stats(times[w]),
                           **{f"{p}_median": statistics.median(v) for p, v in parts[w].items()}}
                       for w in ways},
           "ratio_median": statistics.median(m / o for m, o in zip(many, one, strict=True)),
           "scored_alike": alike}
    print("\n**One evaluation, seconds** (adaptive BN + accuracy; pruning excluded)\n\n"
          "| way | median (IQR) | max | BN pass, median | accuracy pass, median |\n"
          "|---|---|---|---|---|", file=sys.stderr)
    for w in ways:
        s = out["seconds"][w]
        print(f"| {w} | {s['median']:.3f} ({s['iqr']:.3f}) | {s['max']:.3f} | "
              f"{s['bn_median']:.3f} | {s['accuracy_median']:.3f} |", file=sys.stderr)
    print(f"\nratio, a batch a thread / one batch at a time (median over policies): "
          f"{out['ratio_median']:.3f}; the same accuracy on {alike} of {a.policies}",
          file=sys.stderr)
    if a.plot:
        from _output import per_item_plot

        out["plot"] = per_item_plot(a.plot, times, hlines={1.5: "1.5 s (the issue's target)"},
                                    xlabel="policy", ylabel="seconds per evaluation",
                                    title=f"One evaluation on {a.threads} threads",
                                    from_zero=True)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
