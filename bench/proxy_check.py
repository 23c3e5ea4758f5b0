"""Does a cheap score rank pruned models as fine-tuning does? Prints one JSON document.

The search scores a policy by its accuracy after adaptive BN (no training). `end_to_end.py`
fine-tunes each method's winner for real; this script takes those outputs and, for every
distinct pruned model in them, computes scores a search could use instead, then the Kendall
tau of each score against the test accuracy after the benchmark's fine-tune (the mean over the
rows of that model):

- ``adaptive_bn_acc``: what the search scores (BN statistics re-estimated on 10 training
  batches of 128, accuracy on the first 2000 val images);
- ``neg_cross_entropy``, ``neg_kd_loss`` (KL divergence to the unpruned model's soft targets at
  temperature 4), ``teacher_agreement``: the same forward pass, scored without the argmax;
- ``short_finetune_acc``: val accuracy (all 5000) after ``--epochs`` epochs of the
  benchmark's own fine-tune (distillation, lr 0.01, cosine), NetAdapt's "short-term
  fine-tune".

A tp-global row's model is rebuilt from its channel counts with autoprune's pruning (L1 of
each group's root conv), not torch-pruning's group magnitude: the same widths, perhaps not the
same channels.

    python bench/proxy_check.py --results runs/logs/s26/e2e03-merged.json [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "autoprune" / "weights" / "resnet20-fashion-mnist.pt"
SCORES = ("adaptive_bn_acc", "neg_cross_entropy", "neg_kd_loss", "teacher_agreement",
          "short_finetune_acc")


def models_of(results: list[dict]) -> list[dict]:
    """One entry per distinct pruned model: its policy, the methods and seeds that chose it,
    and their test accuracies after the benchmark's fine-tune."""
    groups = next((list(r["policy"]) for r in results if r.get("policy")), None)
    if groups is None:
        raise SystemExit("proxy_check: error: no searched row with a policy in --results; pass "
                         "an end_to_end.py output that ran a searcher")
    out: dict[str, dict] = {}
    for r in results:
        if "test_acc" not in r:
            continue
        policy = r.get("policy") or {g: r["channels"][g] for g in groups}
        key = json.dumps(policy, sort_keys=True)
        m = out.setdefault(key, {"policy": policy, "rows": []})
        m["rows"].append({"method": r["method"], "seed": r.get("seed"),
                          "test_acc": r["test_acc"]})
    return list(out.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", nargs="+", required=True, metavar="JSON",
                    help="end_to_end.py outputs (their `results` lists are merged)")
    ap.add_argument("--weights", default=str(SHIPPED), help="the unpruned checkpoint they pruned")
    ap.add_argument("--epochs", type=int, default=1, help="the short fine-tune's epochs")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from scipy.stats import kendalltau

    from autoprune.data import Batches, load_dataset
    from autoprune.evaluate import recalibrate_bn
    from autoprune.models import ModelSpec, build_model, load_state, read_checkpoint
    from autoprune.policy import Policy
    from autoprune.prune import apply_policy
    from autoprune.train import TrainConfig, evaluate, train

    torch.set_num_threads(a.threads)
    results = []
    for f in a.results:
        try:
            results += json.loads(Path(f).read_text())["results"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            print(f"proxy_check: error: --results {f}: not an end_to_end.py output ({e}); pass "
                  "the JSON it printed", file=sys.stderr)
            return 2
    models = models_of(results)
    ckpt = read_checkpoint(a.weights)
    base = build_model(ModelSpec.from_dict(ckpt["model"]))
    load_state(base, ckpt["state_dict"], source=a.weights)
    base.eval()
    data = load_dataset(ckpt["data"])
    example = torch.zeros(tuple(ckpt["input_shape"]))
    val = data.val.subset(2000)
    with torch.no_grad():
        teacher = torch.cat([base(x) for x, _ in Batches(val, 250)])

    for i, m in enumerate(models):
        t0 = time.perf_counter()
        pruned = apply_policy(base, Policy.from_dict(m["policy"]), importance="l1",
                              example_input=example)
        recalibrate_bn(pruned, data.train, batches=10, batch_size=128, seed=0)
        with torch.no_grad():
            logits = torch.cat([pruned(x) for x, _ in Batches(val, 250)])
        m["adaptive_bn_acc"] = (logits.argmax(1) == val.y).float().mean().item()
        m["neg_cross_entropy"] = -F.cross_entropy(logits, val.y).item()
        m["neg_kd_loss"] = -F.kl_div(F.log_softmax(logits / 4, 1), F.softmax(teacher / 4, 1),
                                     reduction="batchmean").item()
        m["teacher_agreement"] = (logits.argmax(1) == teacher.argmax(1)).float().mean().item()
        train(pruned, data, TrainConfig(epochs=a.epochs, lr=0.01, seed=0, kd_alpha=0.9,
                                        kd_temperature=4.0), teacher=base)
        m["short_finetune_acc"] = evaluate(pruned.eval(), data.val)
        m["test_acc_finetuned"] = statistics.mean(r["test_acc"] for r in m["rows"])
        methods = ",".join(sorted({r["method"] for r in m["rows"]}))
        print(f"[{i + 1}/{len(models)}] {methods}: adaptive BN {m['adaptive_bn_acc']:.2%}, "
              f"{a.epochs} epoch(s) {m['short_finetune_acc']:.2%}, benchmark's fine-tune "
              f"{m['test_acc_finetuned']:.2%} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)

    target = [m["test_acc_finetuned"] for m in models]
    taus = {}
    for s in SCORES:
        tau = kendalltau([m[s] for m in models], target).statistic
        taus[s] = None if tau != tau else tau  # NaN: a constant column
    print("| score | Kendall tau against the fine-tuned test accuracy |", file=sys.stderr)
    print("|---|---|", file=sys.stderr)
    for s, tau in taus.items():
        print(f"| {s} | {'–' if tau is None else f'{tau:.3f}'} |", file=sys.stderr)
    print(json.dumps({"results": a.results, "epochs": a.epochs, "models": models,
                      "kendall_tau": taus}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
