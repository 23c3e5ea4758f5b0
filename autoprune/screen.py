"""The screen before a fine-tune (`autoprune finetune --screen K`): a short fine-tune of each of
the study's K leading, distinct candidates that fit the budget, and the one that trains best
is fine-tuned in full (NetAdapt's short-term fine-tune, at the end of a search).

Why: the search scores a candidate by its accuracy with re-estimated BatchNorm statistics and
no training. At a tight budget that score favours a kind of model, not the model that
fine-tunes best: on the shipped ResNet-20 at 0.3 the top-scored candidates all keep the
stage-3 residual stream whole (64 channels), and against ten epochs of fine-tuning the score
ranked seven pruned models at Kendall tau -0.25 (bench/README.md, `proxy_check.py`).

Contenders are taken in the search's order, the study's best (the measured check's winner)
first; a candidate is skipped when it lies within ``distance`` of one already taken (the mean
over groups of the difference in the fraction of channels kept: the top of a search is
mostly one model a few channels apart), or when, measured on the device as the measured check
measures, it is over the budget by more than the check's tolerance. Each contender's result
is saved as soon as it is known (``screen.json`` beside the fine-tune): an interrupted screen
resumes with the next contender.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._io import write_json
from .errors import UserError
from .evaluate import Candidate, policy_key, ranked
from .policy import Policy


def policy_distance(a: Policy, b: Policy, full: dict[str, int]) -> float:
    """The mean over groups of |channels kept by a - by b| / the group's channels: 0 for the
    same policy, 1 for the unpruned model against one that keeps nothing."""
    da, db = a.to_dict(), b.to_dict()
    return statistics.fmean(abs(da.get(g, n) - db.get(g, n)) / n for g, n in full.items())


def pick_contenders(candidates: list[Candidate], first: Candidate, k: int, *,
                    full: dict[str, int], distance: float,
                    fits: Callable[[Candidate], bool], max_tries: int) -> list[Candidate]:
    """``first`` and up to ``k - 1`` more of ``candidates``, most accurate first (the search's
    order), each at least ``distance`` from every one taken and ``fits`` (measured within
    the budget); at most ``max_tries`` are tried with ``fits``."""
    chosen, tried = [first], 0
    for c in ranked(candidates):
        if len(chosen) >= k or tried >= max_tries:
            break
        if any(policy_distance(c.policy, o.policy, full) < distance for o in chosen):
            continue
        tried += 1
        if fits(c):
            chosen.append(c)
    return chosen


def run_screen(contenders: list[Candidate], train_one: Callable[[Policy], dict[str, float]], *,
               path: Path, key: dict[str, Any],
               on_done: Callable[[int, dict], None] = lambda i, r: None) -> dict[str, Any]:
    """Short-fine-tune every contender (``train_one(policy) -> {"val_acc_before", "val_acc"}``)
    and return the screen's record: ``results`` in contender order and ``winner``, the
    policy whose val accuracy after the short fine-tune is highest (the search's order breaks
    a tie). Results already in ``path`` for the same ``key`` are reused; each new one is
    written there as soon as it is known."""
    done: dict[str, dict] = {}
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{str(path)!r} is corrupt ({e.msg}); delete it to screen "
                            "again") from e
        if saved.get("key") == key:
            done = {policy_key(Policy.from_dict(r["policy"])): r for r in saved["results"]}
    results: list[dict] = []
    for i, c in enumerate(contenders):
        pk = policy_key(c.policy)
        if pk in done:
            r = done[pk]
        else:
            r = {"policy": c.policy.to_dict(), "search_val_acc": c.val_acc,
                 "predicted_ms": c.latency_ms, "macs": c.macs, "params": c.params,
                 "searcher": c.searcher, "trial": c.trial, **train_one(c.policy)}
        results.append(r)
        record = {"key": key, "results": results}
        write_json(path, record)
        on_done(i, r)
    best = max(range(len(results)), key=lambda i: (results[i]["val_acc"], -i))
    record = {"key": key, "results": results, "winner": results[best]["policy"],
              "winner_rank": best}
    write_json(path, record)
    return record
