"""Forward passes over independent batches, spread over threads.

Two batches at a time on one intra-op thread each, rather than one batch on two threads:
on a quiet machine it is as fast (the shipped ResNet-20's candidates, pruned to convs of 4 to
64 channels, evaluated in a search), and where another process takes a core it is 2.4x faster,
since two threads splitting each op both wait for the slower one (`bench/README.md`,
`evaluation.py`). Torch ops release the GIL, so Python threads suffice; each gets the caller's
grad mode (it is thread-local)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def workers_for(n_items: int, workers: int | None = None) -> int:
    """How many threads `split_forward` uses for ``n_items``: ``workers`` (default: torch's
    intra-op threads, i.e. `--threads`), at most one an item."""
    return max(1, min(workers if workers is not None else torch.get_num_threads(), n_items))


def split_forward(fn: Callable[[int, Sequence[T]], Any], items: Sequence[T], *,
                  workers: int | None = None) -> list:
    """``[fn(k, items[k::n]) for k in range(n)]``, n = `workers_for`, each call on a thread of
    its own with torch on one intra-op thread (restored after). With n = 1 it is
    ``[fn(0, items)]`` in the caller, torch's threads untouched."""
    n = workers_for(len(items), workers)
    if n == 1:
        return [fn(0, items)]
    grad = torch.is_grad_enabled()

    def run(k: int):
        with torch.set_grad_enabled(grad):
            return fn(k, items[k::n])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(n, thread_name_prefix="autoprune-forward") as pool:
            return list(pool.map(run, range(n)))
    finally:
        torch.set_num_threads(threads)
