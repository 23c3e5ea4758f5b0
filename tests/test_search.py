"""Evaluator, searchers, the action wall, and studies that survive SIGKILL."""

import copy
import dataclasses
import json
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch

from autoprune.errors import UserError
from autoprune.evaluate import Candidate, Evaluator, resolve_budget
from autoprune.latency.backends import get_backend
from autoprune.latency.devices import get_device
from autoprune.latency.profile import build_table, model_key
from autoprune.models import ModelSpec, build_model
from autoprune.policy import Policy
from autoprune.search import SEARCHERS, BudgetWall, SearchContext
from autoprune.space import SearchSpace, SpaceSpec
from autoprune.train import TrainConfig, train

from .conftest import ROOT, assert_user_error, mid_budget, run_cli


@pytest.fixture(scope="module")
def setup(digits, tmp_path_factory):
    """ResNet-20 briefly trained on digits, its cpu-ort table, an evaluator at a budget
    halfway between the smallest policy and the unpruned model."""
    spec = ModelSpec("resnet20", num_classes=10, in_channels=1, input_size=8)
    # the initial weights come from torch's global generator: seeded, so the model does not
    # depend on which tests drew from it before (its accuracy varied 88 to 90% with them)
    torch.manual_seed(0)
    model = build_model(spec)
    train(model, digits, TrainConfig(epochs=3, batch_size=64, lr=0.05))
    model.eval()
    device = get_device("cpu-ort")
    space = SearchSpace.from_model(model, torch.zeros(1, 1, 8, 8),
                                   SpaceSpec.for_family("resnet"), round_to=8)
    with get_backend(device) as backend:
        lat = build_table(model, space, device, backend, key=model_key("resnet20", (1, 1, 8, 8)),
                          model_name="resnet20",
                          path=tmp_path_factory.mktemp("t") / "cpu-ort" / "resnet20.json",
                          calibrate_n=3)
    pred = lat.predictor()
    # halfway to the smallest policy: a fixed fraction can be infeasible (see mid_budget)
    budget = resolve_budget(pred, fraction=(pred.min_latency() / pred.max_latency() + 1) / 2)
    ev = Evaluator(model, digits, space, pred, budget_ms=budget, val_images=200, bn_batches=3)
    return model, space, pred, budget, ev


def _ctx(ev, n, tmp_path, name="s", *, known=False):
    """``known``: the searcher is told which policies ``ev`` has evaluated (as a study tells
    it), so it moves repeats to new policies; off where ``ev`` is shared between tests."""
    found = []

    def evaluate(policy, trial):
        return ev.evaluate(policy, searcher="test", trial=trial)

    ctx = SearchContext(evaluate=evaluate, n_trials=n, seed=0, state_dir=tmp_path / "state",
                        storage_url=f"sqlite:///{tmp_path / 'optuna.db'}", study_name=name,
                        on_candidate=found.append,
                        known=(lambda p: p in ev.cache) if known else (lambda p: False))
    return ctx, found


def test_evaluator_caches_and_scores(setup):
    model, space, pred, budget, ev = setup
    p = space.uniform(0.5)
    before = ev.evaluations
    c1 = ev.evaluate(p, searcher="x", trial=1)
    c2 = ev.evaluate(p, searcher="y", trial=2)
    assert c1 is c2 and ev.evaluations == before + 1
    assert 0 <= c1.val_acc <= 1 and c1.latency_ms == pytest.approx(pred.predict(p))
    full = ev.evaluate(space.full())
    assert c1.macs < full.macs and c1.params < full.params
    assert Candidate.from_json(c1.to_json()) == c1


def test_adaptive_bn_helps_a_pruned_model(setup, digits):
    model, space, pred, budget, _ = setup
    # keeping three quarters: with half, both are within a few points of chance (10%) and
    # which is ahead depended on the initial weights
    p = space.uniform(0.75)
    kw = dict(budget_ms=budget, val_images=300)
    with_bn = Evaluator(model, digits, space, pred, adaptive_bn=True, **kw).evaluate(p)
    without = Evaluator(model, digits, space, pred, adaptive_bn=False, **kw).evaluate(p)
    assert with_bn.val_acc > without.val_acc + 0.1, (with_bn.val_acc, without.val_acc)


def test_an_evaluation_on_several_threads_scores_what_one_thread_scores(setup, digits):
    """Adaptive BN on several threads (copies of the model, each on some of the batches, their
    averages merged by number of batches) gives the running statistics of one pass over all
    the batches, up to rounding, uneven shares included (10 batches on 3 threads); the
    accuracy pass on several threads counts the same images right."""
    from autoprune.evaluate import recalibrate_bn
    from autoprune.prune import apply_policy
    from autoprune.train import evaluate

    model, space, _, _, _ = setup
    pruned = apply_policy(model, space.uniform(0.5), example_input=torch.zeros(1, 1, 8, 8))
    models = {w: copy.deepcopy(pruned) for w in (1, 2, 3)}
    for w, m in models.items():
        recalibrate_bn(m, digits.train, batches=10, batch_size=32, seed=4, workers=w)
    bns = {w: [b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]
           for w, m in models.items()}
    assert bns[1] and not bns[1][0].training  # back in eval mode
    for w in (2, 3):
        for one, many in zip(bns[1], bns[w], strict=True):
            torch.testing.assert_close(many.running_mean, one.running_mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(many.running_var, one.running_var, rtol=1e-5, atol=1e-6)
            assert many.num_batches_tracked.item() == 10 and many.momentum == one.momentum
    # the statistics moved: the pruned copy's were the unpruned model's
    assert not torch.allclose(bns[1][1].running_mean,
                              [b for b in pruned.modules()
                               if isinstance(b, torch.nn.BatchNorm2d)][1].running_mean)
    threads = torch.get_num_threads()
    accs = {w: evaluate(models[1], digits.val, batch_size=16, workers=w) for w in (1, 2, 3)}
    assert accs[1] == accs[2] == accs[3] and 0 < accs[1] <= 1
    assert models[1].training is False and torch.get_num_threads() == threads  # restored


def test_infeasible_budget_is_refused_up_front(setup):
    _, _, pred, _, _ = setup
    low = pred.min_latency() / pred.max_latency() * 0.9
    with pytest.raises(UserError, match="below the smallest achievable") as e:
        resolve_budget(pred, fraction=low)
    # ResNet-20's 16-channel groups keep 8 on the 8-channel grid (min_keep 0.25 asks for 4):
    # the grid is a lever too, and the message says so
    sixteen = sum(g.channels == 16 for g in pred.space.groups)
    said = re.search(r"`--round-to 4`, with a table profiled on it\): (\d+) of (\d+) groups",
                     str(e.value))
    assert said and sixteen <= int(said[1]) <= int(said[2]) == len(pred.space.groups)
    with pytest.raises(UserError, match="must be in \\(0, 1\\]"):
        resolve_budget(pred, fraction=1.5)


def test_check_env(setup):
    from gymnasium.utils.env_checker import check_env

    from autoprune.search.amc import PruningEnv

    _, space, pred, budget, ev = setup
    env = PruningEnv(space, pred, budget, lambda p, ep: ev.evaluate(p))
    check_env(env, skip_render_check=True)


@pytest.mark.parametrize("action", ["bounds", "wall", "share", "reach"])
def test_action_wall_never_ends_infeasible(setup, action):
    from autoprune.search.amc import PruningEnv

    _, space, pred, budget, ev = setup
    rng = np.random.default_rng(0)
    seen = []
    env = PruningEnv(space, pred, budget, lambda p, ep: seen.append(p) or ev.evaluate(p),
                     action=action)
    for _ in range(25):
        env.reset()
        done = False
        while not done:
            _, _, done, _, _ = env.step(rng.uniform(0, 1, size=1).astype(np.float32))
    assert len(seen) == 25
    assert all(pred.predict(p) <= budget * (1 + 1e-9) for p in seen)
    if action == "wall":  # action 1 keeps all the wall allows: the last group fills the budget
        env.reset()
        done = False
        while not done:
            _, _, done, _, _ = env.step(np.ones(1, np.float32))
        last = space.groups[-1]
        wider = [c for c in last.choices if c > seen[-1][last.name]]
        assert not wider or pred.predict({**seen[-1].to_dict(), last.name: wider[0]}) > budget
    if action in ("share", "reach"):  # 0 spends nothing; 0.5 spreads the slack over groups
        for a, check in ((0.0, lambda p: p == space.smallest()),
                         (0.5, lambda p: sum(p[g.name] > g.min_channels for g in space.groups)
                          >= len(space) // 2)):
            env.reset()
            done = False
            while not done:
                _, _, done, _, _ = env.step(np.full(1, a, np.float32))
            assert check(seen[-1]), (a, seen[-1])
    if action == "reach":  # 1 at the first step takes all the wall allows, then 0 nothing
        env.reset()
        env.step(np.ones(1, np.float32))
        first = space.groups[0]
        assert env.partial[first.name] == BudgetWall(space, pred, budget).max_keep({}, first.name)
        done = False
        while not done:
            _, _, done, _, _ = env.step(np.zeros(1, np.float32))
        assert all(seen[-1][g.name] == g.min_channels for g in space.groups[1:])
    wall = BudgetWall(space, pred, budget)
    for _ in range(200):  # clipping arbitrary proposals in group order is always feasible too
        proposal = {g.name: int(rng.choice(g.choices)) for g in space.groups}
        assert pred.predict(_clipped_in_order(wall, space, proposal)) <= budget * (1 + 1e-9)


def _clipped_in_order(wall, space, proposal):
    """AMC's per-step wall applied to a whole proposal, group by group."""
    out = {}
    for g in space.groups:
        out[g.name] = min(proposal[g.name], wall.max_keep(out, g.name))
    return Policy.from_dict(out)


def _shipped_predictor(name):
    """The predictor of a table shipped in latency_tables/cpu-ort/ for ``name`` on 28x28
    Fashion-MNIST input: measured, committed, so the same in every run of a test. (Read as it
    is: the CPU check that refuses it for a search on another machine is not what is tested.)"""
    from autoprune.latency.devices import LATENCY_TABLES_DIR
    from autoprune.latency.profile import LatencySetup, model_ops
    from autoprune.latency.table import LatencyTable

    model = build_model(ModelSpec(name, num_classes=10, in_channels=1, input_size=28)).eval()
    x = torch.zeros(1, 1, 28, 28)
    space = SearchSpace.from_model(model, x, SpaceSpec.for_family("resnet"), round_to=8)
    table = LatencyTable.load(LATENCY_TABLES_DIR / "cpu-ort" / f"{name}.json")
    return LatencySetup(get_device("cpu-ort"), space, model_ops(model, x, space), table,
                        model_key(name, tuple(x.shape))).predictor()


@pytest.mark.parametrize("table", ["fixture", "resnet20", "resnet56"])
def test_projection_is_feasible_and_keeps_the_proposal_shape(setup, table):
    """Projection onto the budget on the fixture's table (measured now, for an 8x8 model) and on
    the shipped ResNet tables. Whether it spares the later groups is asserted on the shipped
    ones only: the 8x8 model's latency is mostly fixed cost, so its table is mostly noise (its
    smallest policy predicted at 0.38 to 0.73 of the unpruned one in 8 builds here), and
    clipping collapsed 1.1x to 4x as many groups as projecting, once (in CI) fewer."""
    pred = setup[2] if table == "fixture" else _shipped_predictor(table)
    space = pred.space
    lo, hi = pred.min_latency(), pred.max_latency()
    late = space.groups[len(space) // 2:]

    def collapsed(policy, proposal):  # later groups cut to their minimum, proposed wider
        return sum(policy[g.name] == g.min_channels < proposal[g.name] for g in late)

    # halfway from the smallest policy to the unpruned model, where many proposals fit, and a
    # tight budget a tenth of the way, where most do not
    for budget in (lo + 0.5 * (hi - lo), lo + 0.1 * (hi - lo)):
        wall = BudgetWall(space, pred, budget)
        rng = np.random.default_rng(1)
        by_clipping = by_projecting = 0
        for _ in range(200):
            proposal = {g.name: int(rng.choice(g.choices)) for g in space.groups}
            p = wall.project(proposal)
            assert pred.predict(p) <= budget * (1 + 1e-9)
            for g in space.groups:  # never wider than proposed, always on the grid
                assert p[g.name] <= proposal[g.name] and p[g.name] in g.choices
            if pred.predict(proposal) <= budget:
                assert p.to_dict() == proposal  # a feasible proposal is left alone
            by_projecting += collapsed(p, proposal)
            by_clipping += collapsed(_clipped_in_order(wall, space, proposal), proposal)
        # The point of projecting: clipping in group order spends the budget on the first
        # groups and cuts the later ones to their minimum whatever was proposed for them. On
        # the shipped tables clipping cut 2.4x to 4.6x as many, at both budgets, with three
        # seeds of proposals.
        if table != "fixture":
            assert 2 * by_projecting < by_clipping, (budget, by_projecting, by_clipping)


def test_a_repeat_moves_to_a_feasible_neighbour_not_yet_evaluated(setup):
    _, space, pred, _, _ = setup
    lo, hi = pred.min_latency(), pred.max_latency()
    wall = BudgetWall(space, pred, lo + 0.1 * (hi - lo))
    rng = np.random.default_rng(0)
    index = {g.name: g.choices.index for g in space.groups}
    for _ in range(20):
        p = wall.project({g.name: int(rng.choice(g.choices)) for g in space.groups})
        seen = {p}
        q = wall.unseen_near(p, seen.__contains__, rng)
        assert q != p and wall.allows(pred.predict(q))
        assert all(abs(index[g](q[g]) - index[g](p[g])) <= 1 for g in space.names)
        wider = [g for g in space.names if q[g] > p[g]]
        narrower = [g for g in space.names if q[g] < p[g]]
        if wider and narrower:  # one group wider traded a grid point of one other
            assert len(wider) == len(narrower) == 1
            assert not wall.fits({**p.to_dict(), wider[0]: q[wider[0]]})
        else:  # one group one grid point
            assert len(wider) + len(narrower) == 1
    assert wall.unseen_near(p, lambda _: True, rng) == p  # nothing new anywhere: the repeat
    # where the walk finds nothing new (here: no steps), a random draw projected onto the
    # budget, feasible and new
    draws = [wall.unseen_near(p, {p}.__contains__, rng, hops=0) for _ in range(20)]
    assert all(q != p and wall.allows(pred.predict(q)) for q in draws)
    assert len(set(draws)) > 1
    assert wall.unseen_near(p, {p}.__contains__, rng, hops=0, draws=0) == p


@pytest.fixture(scope="module")
def shipped():
    """The shipped ResNet-20 trained on Fashion-MNIST, the data, and the predictor of its shipped
    cpu-ort table: all of it committed, so a search on it is the same in every run."""
    from autoprune.data import load_dataset
    from autoprune.models import load_state, read_checkpoint

    path = ROOT / "autoprune" / "weights" / "resnet20-fashion-mnist.pt"
    ckpt = read_checkpoint(path)
    model = build_model(ModelSpec.from_dict(ckpt["model"]))
    load_state(model, ckpt["state_dict"], source=str(path))
    return model.eval(), load_dataset("fashion-mnist"), _shipped_predictor("resnet20")


@pytest.mark.parametrize("name", ["random", "evolution"])
def test_searchers_evaluate_a_new_policy_each_trial_at_a_tight_budget(shipped, tmp_path, name):
    """A twentieth of the way from the smallest policy to the unpruned model few policies fit,
    and projection sends many proposals onto the same ones: told which were evaluated, every
    trial evaluates a new policy. Untold, NSGA-II repeats some (its children repeat their
    parents' policies; served from the cache, a trial with no new candidate): 18 distinct of
    24 here. random's independent draws collide only by chance, so only its told run is
    checked. On the shipped table, not the digits fixture's: that one is mostly noise, and on
    some builds so many policies fit that untold NSGA-II repeated none."""
    model, data, pred = shipped
    space = pred.space
    lo, hi = pred.min_latency(), pred.max_latency()
    tight = lo + 0.05 * (hi - lo)
    distinct = {}
    for known in (False, True) if name == "evolution" else (True,):
        ev = Evaluator(model, data, space, pred, budget_ms=tight, val_images=50, bn_batches=1)
        options = {"population": 4} if name == "evolution" else {}
        searcher = SEARCHERS[name]()(space, pred, tight, seed=0, **options)
        ctx, found = _ctx(ev, 24, tmp_path / str(known), name, known=known)
        (tmp_path / str(known)).mkdir()
        searcher.run(ctx)
        assert len(found) == 24 and all(c.feasible for c in found)
        distinct[known] = len({c.policy for c in found})
    assert distinct[True] == 24, distinct
    if name == "evolution":
        assert distinct[False] < 24, distinct


@pytest.mark.parametrize("name,n", [("uniform", 3), ("random", 6), ("evolution", 8),
                                    ("amc", 6)])
def test_each_searcher_finds_a_feasible_policy(setup, tmp_path, monkeypatch, name, n):
    _, space, pred, budget, ev = setup
    scratch = tmp_path / "tmp"  # the temp dir: nothing may be left behind in it
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    options = {"population": 4} if name == "evolution" else \
        {"warmup_episodes": 2} if name == "amc" else {}
    searcher = SEARCHERS[name]()(space, pred, budget, seed=0, **options)
    ctx, found = _ctx(ev, n, tmp_path, name)
    threads, inner = [], ctx.evaluate

    def evaluate(policy, trial):
        threads.append(torch.get_num_threads())
        return inner(policy, trial)

    if name == "amc":  # the agent's updates run on the caller's threads too
        from autoprune.search.amc import make_agent_class

        cls, update_threads = make_agent_class(), []
        inner_train = cls._train

        def _train(agent, *args):
            update_threads.append(torch.get_num_threads())
            return inner_train(agent, *args)

        monkeypatch.setattr(cls, "_train", _train)

    torch.set_num_threads(2)  # the caller's choice (`--threads`)
    try:
        searcher.run(dataclasses.replace(ctx, evaluate=evaluate))
    finally:
        after = torch.get_num_threads()
        torch.set_num_threads(1)
    # evaluations run on the caller's threads (amc's agent acts on one), and it gets them back
    assert set(threads) == {2} and after == 2
    if name == "amc":  # the first update on the caller's threads, then alternating with one
        assert update_threads[:4] == [2, 1, 2, 1][:len(update_threads)]
    if name == "uniform":  # its best and the fallbacks the space has room for, at most 2
        from autoprune.search.baselines import uniform_ladder

        assert [c.policy for c in found] == uniform_ladder(space, pred, budget, n)
        assert 1 <= len(found) <= n
    else:
        assert len(found) == n
    assert all(c.feasible for c in found)
    assert max(c.val_acc for c in found) > 0.1
    if name == "amc":  # N evaluated candidates, however many episodes repeated a policy
        assert len({c.policy for c in found}) == n
        ckpt = ctx.state_dir / json.loads((ctx.state_dir / "latest.json").read_text())["dir"]
        state = json.loads((ckpt / "state.json").read_text())
        assert state["candidates_new"] == n <= state["episodes_done"]
    assert list(scratch.iterdir()) == []  # e.g. SB3's default logger made an SB3-<date> folder


def test_uniform_ladder_falls_back_to_cheaper_uniform_policies(setup):
    """uniform's best, then cheaper uniform policies, each predicted at most 0.95 x the one
    before: what the measured check falls back on when the best measures over budget. It
    stops early only where no uniform policy is that much cheaper."""
    from autoprune.search.baselines import best_uniform, uniform_ladder

    _, space, pred, budget, _ = setup
    full, floor = pred.max_latency(), pred.predict(space.uniform(0.0))
    assert floor < 0.95 * full  # room below the unpruned model for one fallback at least
    for b in (full, budget):
        ladder = uniform_ladder(space, pred, b, 4)
        assert ladder[0] == best_uniform(space, pred, b) and 1 <= len(ladder) <= 4
        if b == full:
            assert ladder[0] == space.full() and len(ladder) >= 2
        lat = [pred.predict(p) for p in ladder]
        assert lat[0] <= b
        assert all(y <= 0.95 * x for x, y in zip(lat[:-1], lat[1:], strict=True))
        for p in ladder:  # each the largest uniform policy at its own latency
            assert best_uniform(space, pred, pred.predict(p)) == p
        if len(ladder) < 4:  # stopped at the floor, not before
            assert 0.95 * lat[-1] < floor
    assert uniform_ladder(space, pred, budget, 1) == [best_uniform(space, pred, budget)]


@pytest.mark.parametrize("fraction", [0.3, 0.5])
def test_evolution_seeds_keep_each_group_whole_in_turn(fraction):
    """The first generation's seeds on the shipped ResNet-20 table: the uniform policy at the
    budget first, then one per group with that group wider than uniform (whole, or the widest
    that fits) and paid for by the others; every seed feasible, none twice."""
    from autoprune.search.base import seed_policies
    from autoprune.search.baselines import best_uniform

    pred = _shipped_predictor("resnet20")
    space = pred.space
    budget = pred.min_latency() + fraction * (pred.max_latency() - pred.min_latency())
    wall = BudgetWall(space, pred, budget)
    uniform = best_uniform(space, pred, budget)
    seeds = seed_policies(space, wall, uniform)
    assert seeds[0] == uniform and len(set(seeds)) == len(seeds)
    assert all(pred.predict(p) <= budget * (1 + 1e-9) for p in seeds)
    wider = {g.name for p in seeds[1:] for g in space.groups if p[g.name] > uniform[g.name]}
    # each seed widens the group it holds (a group already whole in the uniform policy has
    # none), and only pays with the others: none wider than uniform but the held one
    held = [g for g in space.groups if uniform[g.name] < g.channels]
    assert len(seeds) - 1 <= len(held) and wider <= {g.name for g in held}
    for p in seeds[1:]:
        (g,) = [g for g in space.groups if p[g.name] > uniform[g.name]]
        assert p[g.name] == g.channels or p[g.name] == wall.max_keep({}, g.name)
    assert len(wider) >= len(held) - 1


def test_evolution_tries_every_seed_once_across_a_resume(setup, digits, tmp_path):
    """A study stopped before its seeds are all tried enqueues the rest when it resumes, and
    none of those it already tried."""
    from autoprune.search.base import seed_policies
    from autoprune.search.baselines import best_uniform

    model, space, pred, budget, _ = setup
    ev = Evaluator(model, digits, space, pred, budget_ms=budget, val_images=100, bn_batches=1)
    seeds = seed_policies(space, BudgetWall(space, pred, budget), best_uniform(space, pred, budget))
    assert len(seeds) >= 3, seeds
    found = []
    for n in (2, len(seeds) + 2):
        ctx, part = _ctx(ev, n, tmp_path, "evo", known=True)
        SEARCHERS["evolution"]()(space, pred, budget, seed=0, population=4).run(ctx)
        found += part
    assert [c.policy for c in found[:len(seeds)]] == seeds
    assert len({c.policy for c in found}) == len(found) == len(seeds) + 2


def test_evolution_with_a_seed_is_reproducible(setup, tmp_path):
    """One process, one study: the same `--seed` proposes the same policies (only workers
    sharing a storage mix their process id into it, so they do not propose the same)."""
    _, space, pred, budget, ev = setup
    runs = []
    for i in range(2):
        ctx, found = _ctx(ev, 6, tmp_path / str(i), "evo")
        (tmp_path / str(i)).mkdir()
        SEARCHERS["evolution"]()(space, pred, budget, seed=3, population=4).run(ctx)
        runs.append([c.policy for c in found])
    assert runs[0] == runs[1] and len(set(runs[0])) > 1


def test_evolution_writes_finished_trials_and_resumes_what_the_file_lacks(setup, digits,
                                                                          tmp_path):
    """A study's own SQLite file gets each finished trial, numbered as the candidates are. On
    resume, a logged candidate whose trial the file lacks (the process died in between) is
    proposed again under its number and served from the cache; unfinished trials that an older
    version left in the file (RUNNING, WAITING) are failed there and their policies proposed
    again."""
    import optuna
    from optuna.trial import TrialState

    model, space, pred, budget, _ = setup
    # an evaluator of its own: which policies the shared one has cached depends on test order
    ev = Evaluator(model, digits, space, pred, budget_ms=budget, val_images=200, bn_batches=3)
    searcher = SEARCHERS["evolution"]()(space, pred, budget, seed=1, population=4)
    ctx, found = _ctx(ev, 5, tmp_path, "evo", known=True)
    searcher.run(ctx)
    stored = optuna.load_study(study_name="evo", storage=ctx.storage_url)
    assert [t.number for t in stored.trials] == [c.trial for c in found] == list(range(5))
    assert all(t.state == TrialState.COMPLETE for t in stored.trials)
    assert [t.user_attrs["policy"] for t in stored.trials] == [c.policy.to_dict() for c in found]
    assert stored.trials[0].system_attrs.get("fixed_params")  # the uniform seed
    # each trial's parameters are the genome of the policy it evaluated (`write_genome`)
    genome = lambda p: {g.name: g.choices.index(p[g.name]) for g in space.groups}  # noqa: E731
    assert [t.params for t in stored.trials] == [genome(c.policy) for c in found]

    # trial 5 was logged (evaluated) but the process died before the file got it
    orphan = searcher.wall.project({g.name: g.min_channels for g in space.groups})
    assert orphan not in ev.cache
    ev.evaluate(orphan, searcher="test", trial=5)
    done = {c.trial: c.policy for c in found} | {5: orphan}
    evaluations = ev.evaluations
    ctx, found2 = _ctx(ev, 7, tmp_path, "evo", known=True)
    searcher.run(dataclasses.replace(ctx, done_trials=done))
    stored = optuna.load_study(study_name="evo", storage=ctx.storage_url)
    assert [t.state for t in stored.trials] == [TrialState.COMPLETE] * 7
    assert stored.trials[5].user_attrs["policy"] == orphan.to_dict()
    # the logged policy is served under its number, not moved on as a repeat would be
    assert [c.trial for c in found2] == [5, 6] and found2[0].policy == orphan
    assert ev.evaluations - evaluations == 1 and found2[1].policy not in done.values()

    # leftovers of an older version, which sampled in the file: a RUNNING and a WAITING trial
    running = searcher.wall.project({g.name: g.choices[1] for g in space.groups})
    waiting = searcher.wall.project({g.name: g.choices[-1] if i % 2 else g.choices[0]
                                     for i, g in enumerate(space.groups)})
    stored.add_trial(optuna.trial.create_trial(state=TrialState.RUNNING, params=genome(running),
                                               distributions=stored.trials[0].distributions))
    stored.enqueue_trial(genome(waiting))
    done |= {c.trial: c.policy for c in found2}
    ctx, found3 = _ctx(ev, 9, tmp_path, "evo", known=True)
    searcher.run(dataclasses.replace(ctx, done_trials=done))
    stored = optuna.load_study(study_name="evo", storage=ctx.storage_url)
    states = [t.state for t in stored.trials]
    assert states == [TrialState.COMPLETE] * 7 + [TrialState.FAIL] * 2 + [TrialState.COMPLETE] * 2
    assert [t.number for t in stored.trials] == list(range(11))
    assert [c.policy for c in found3] == [running, waiting]
    assert [t.user_attrs["policy"] for t in stored.trials[9:]] == [running.to_dict(),
                                                                   waiting.to_dict()]


def _rdb_url(kind: str, tmp_path, request, name: str = "s") -> str:
    """An empty RDB storage of ``kind``: a SQLite file under ``tmp_path``, or a new database
    on the suite's PostgreSQL server (the `postgres` fixture)."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / (name + '.db')}"
    return request.getfixturevalue("postgres")(f"{name}_{os.getpid()}_{time.monotonic_ns()}")


def _count_rows(url: str, table: str) -> int:
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as con:
            return con.execute(sqlalchemy.text(f"SELECT COUNT(*) FROM {table}")).scalar_one()
    finally:
        engine.dispose()


@pytest.mark.parametrize("where", ["memory", "sqlite", "postgresql"])
def test_a_trial_keeps_the_genome_of_the_policy_it_evaluated(tmp_path, where, request):
    """`write_genome` replaces a running trial's proposed parameters by the genome evaluated,
    in the in-memory copy a study's own file is sampled from and in an RDB storage
    (`--storage`), where Optuna's own call cannot give a parameter a second value."""
    import optuna
    from optuna.storages import RDBStorage

    from autoprune.search.evolution import write_genome

    url = None if where == "memory" else _rdb_url(where, tmp_path, request)
    storage = None if url is None else RDBStorage(url)
    study = optuna.create_study(storage=storage, directions=["maximize", "minimize"],
                                sampler=optuna.samplers.NSGAIISampler(population_size=4, seed=0))
    trials = []
    for k in range(3):
        trial = study.ask()
        proposed = {f"g{i}": trial.suggest_int(f"g{i}", 0, 7) for i in range(4)}
        evaluated = {**proposed, "g0": (proposed["g0"] + 3) % 8, "g3": (proposed["g3"] + k) % 8}
        write_genome(study, trial, evaluated)
        study.tell(trial, [0.1 * k, 1.0])
        trials.append(evaluated)
    if storage is not None:
        study = optuna.load_study(study_name=study.study_name, storage=storage)
        assert _count_rows(url, "trial_params") == 12  # one row per parameter still
    assert [t.params for t in study.trials] == trials


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_shared_trial_written_at_once_is_the_trial_optunas_calls_write(tmp_path, kind, request):
    """On shared storage the searcher samples a trial's parameters without writing them
    (`proposed_params`) and writes them, then its result, in one transaction each
    (`write_running_trial`). With one seed, NSGA-II proposes the same trials that way as through
    Optuna's own calls (an enqueued seed, a first generation drawn at random, then bred), and
    the storage holds the same trials; a finished trial is refused as Optuna refuses it."""
    import optuna
    from optuna.distributions import IntDistribution
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.storages import RDBStorage

    from autoprune.search.evolution import proposed_params, write_running_trial

    dists = {f"g{i}": IntDistribution(0, 5) for i in range(6)}
    studies = []
    for at_once in (False, True):
        url = _rdb_url(kind, tmp_path, request, f"once{int(at_once)}")
        study = optuna.create_study(
            storage=RDBStorage(url), study_name="s", directions=["maximize", "minimize"],
            sampler=optuna.samplers.NSGAIISampler(population_size=4, seed=3))
        study.enqueue_trial({name: 2 for name in dists})

        def objective(trial, study=study, at_once=at_once):
            _ = trial.relative_params
            if at_once:
                genes = proposed_params(trial, dists)
                write_running_trial(study, trial, params=genes, dists=dists)
                write_running_trial(study, trial, user_attrs={"policy": genes}, system_attrs={
                    "constraints:over": sum(genes.values()) - 12.0})
            else:
                genes = {name: trial.suggest_int(name, d.low, d.high)
                         for name, d in dists.items()}
                trial.set_user_attr("policy", genes)
                trial.set_constraint("over", sum(genes.values()) - 12.0)
            return sum(genes.values()) / 30.0, float(genes["g0"])

        study.optimize(objective, n_trials=14)
        studies.append(optuna.load_study(study_name="s", storage=url))
        if at_once:
            trial = study.ask()
            write_running_trial(study, trial, user_attrs={"k": 1})
            write_running_trial(study, trial, user_attrs={"k": 2})  # overwritten
            study.tell(trial, [0.0, 0.0])
            assert study.trials[-1].user_attrs == {"k": 2}
            with pytest.raises(UpdateFinishedTrialError):
                write_running_trial(study, trial, params={"g0": 1}, dists=dists)
    a, b = studies[0].trials, studies[1].trials[:-1]  # the last: the refused write's
    assert len(a) == len(b) == 14 and a[0].params == dict.fromkeys(dists, 2)
    assert max(t.system_attrs["NSGAIISampler:generation"] for t in b) >= 2  # bred, not drawn
    for x, y in zip(a, b, strict=True):
        for name in ("state", "values", "params", "distributions", "user_attrs",
                     "system_attrs"):
            assert getattr(x, name) == getattr(y, name), name


def test_finished_trials_written_with_plain_inserts_read_back_as_optuna_writes_them(tmp_path):
    """`append_trial` stores what `Study.add_trial` stores (it skips Optuna's ORM round trips):
    the same trials come back from both files, field by field, an infinite value included."""
    import math

    import optuna
    from optuna.distributions import IntDistribution
    from optuna.trial import TrialState, create_trial

    from autoprune.search.evolution import append_trial

    studies = [optuna.create_study(storage=f"sqlite:///{tmp_path / f'{k}.db'}", study_name="s",
                                   directions=["maximize", "minimize"]) for k in "ab"]
    dists = {f"g{i}": IntDistribution(0, 6) for i in range(12)}
    for k in range(3):
        trial = create_trial(
            state=TrialState.COMPLETE if k < 2 else TrialState.FAIL,
            values=[0.5 + k, math.inf if k == 1 else 0.1] if k < 2 else None,
            params={n: (k + i) % 7 for i, n in enumerate(dists)}, distributions=dists,
            user_attrs={"policy": {"conv1": 8, "layer1": k}},
            system_attrs={"constraints": [0.1 - k], "nsga2:generation": k,
                          "fixed_params": {"g0": 1}})
        studies[0].add_trial(trial)
        append_trial(studies[1], trial)
    a, b = (optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / f'{k}.db'}")
            .trials for k in "ab")
    assert len(a) == len(b) == 3 and b[1].values[1] == math.inf
    for x, y in zip(a, b, strict=True):
        for name in ("number", "state", "values", "params", "distributions", "user_attrs",
                     "system_attrs", "datetime_start", "datetime_complete"):
            assert getattr(x, name) == getattr(y, name), name


def test_predictor_sweep_equals_one_prediction_per_width(setup):
    """``sweep`` (every width of one group, the rest fixed) gives what ``predict`` gives for
    each, for groups ops read and write (the residual streams: several of each), and for
    policies with a width off the grid (there it falls back to ``predict``)."""
    _, space, pred, _, _ = setup
    rng = np.random.default_rng(0)
    for _ in range(10):
        p = {g.name: int(rng.choice(g.choices)) for g in space.groups}
        p.pop(space.groups[int(rng.integers(len(space)))].name)  # a group left full
        for g in space.groups:
            want = {c: pred.predict({**p, g.name: c}) for c in g.choices}
            assert pred.sweep(p, g.name) == pytest.approx(want, rel=1e-12, abs=0)
    g, other = space.groups[1], space.groups[-1]
    off = {other.name: other.choices[0] + 1}  # between two grid points: interpolated
    assert off[other.name] not in other.choices
    assert pred.sweep(off, g.name) == {c: pred.predict({**off, g.name: c}) for c in g.choices}


@pytest.mark.parametrize("action", ["bounds", "wall", "share", "reach"])
def test_amc_env_moves_a_repeated_policy_and_traces_the_one_it_evaluated(setup, digits,
                                                                        action):
    """Given the study's ``known``, an episode that builds a policy an earlier episode
    evaluated evaluates a feasible neighbour nobody evaluated instead, and says so; its
    trace is, step by step, the observation and the action with which the env picks the
    neighbour's width (the transitions the agent learns from)."""
    from autoprune.search.amc import PruningEnv

    model, space, pred, budget, _ = setup
    ev = Evaluator(model, digits, space, pred, budget_ms=budget, val_images=200, bn_batches=3)
    env = PruningEnv(space, pred, budget, lambda p, ep: ev.evaluate(p, trial=ep),
                     action=action, known=lambda p: p in ev.cache, seed=0)

    def episode(a):
        env.reset()
        done = False
        while not done:
            _, _, done, _, info = env.step(np.array([a], np.float32))
        return info

    first = episode(0.5)
    assert first["new"] and not first["repeat"] and "trace" not in first
    built = first["candidate"].policy
    second = episode(0.5)  # the same actions build the same policy: moved
    moved = second["candidate"].policy
    assert second["repeat"] and second["new"] and second["candidate"].trial == 1
    assert moved != built and pred.predict(moved) <= budget * (1 + 1e-9)
    steps = sum(abs(g.choices.index(moved[g.name]) - g.choices.index(built[g.name]))
                for g in space.groups)
    assert 1 <= steps <= 2 * 4  # a neighbour: a few grid steps (`unseen_near`'s hops)
    assert len(second["trace"]) == len(space)
    env.reset()
    smallest = space.smallest().to_dict()
    for g, (obs, a) in zip(space.groups, second["trace"], strict=True):
        assert obs == pytest.approx(env._obs())
        before = dict(env.partial)
        env.step(np.array([a], np.float32))
        got, want = env.partial[g.name], moved[g.name]
        if action in ("share", "reach"):  # widths that cost the same are one action
            costs = pred.sweep({**smallest, **before}, g.name)
            assert costs[got] == pytest.approx(costs[want], rel=1e-6) or a == 1.0
        else:
            assert got == want
        env.partial[g.name] = want  # on along the neighbour's episode
    # without ``known`` (AMC, ``repeats="replay"``) the repeat is served from the cache
    plain = PruningEnv(space, pred, budget, lambda p, ep: ev.evaluate(p, trial=ep),
                       action=action, seed=0)
    plain.episode = 2
    plain.reset()
    done = False
    while not done:
        _, _, done, _, info = plain.step(np.array([0.5], np.float32))
    assert info["candidate"].policy == built and info["repeat"] and not info["new"]


def test_amc_first_episodes_evaluate_the_seeds_and_the_agent_learns_from_them(setup, digits):
    """By default the first episodes evaluate evolution's seeds in order (the uniform policy,
    then one per group kept whole) in place of the policies they build, traced for the agent
    and counted apart from moves; then episodes go on as any other. ``"random"`` is AMC's
    warm-up alone, and only the default is written in the study's options."""
    from autoprune.search.base import BudgetWall, seed_policies
    from autoprune.search.baselines import best_uniform

    model, space, pred, budget, _ = setup
    ev = Evaluator(model, digits, space, pred, budget_ms=budget, val_images=100, bn_batches=1)
    searcher = SEARCHERS["amc"]()(space, pred, budget, seed=0, warmup_episodes=2)
    seeds = searcher.first_policies()
    assert seeds == seed_policies(space, BudgetWall(space, pred, budget),
                                  best_uniform(space, pred, budget))
    assert len(seeds) > 2 and searcher.options()["warmup_policies"] == "seeds"
    plain = SEARCHERS["amc"]()(space, pred, budget, seed=0, warmup_policies="random")
    assert plain.first_policies() == [] and "warmup_policies" not in plain.options()
    env = searcher.make_env(lambda p, ep: ev.evaluate(p, trial=ep), known=lambda p: p in ev.cache)
    agent = searcher.make_agent(env)
    infos = []
    for _ in range(len(seeds) + 1):
        obs, _ = env.reset()
        done = False
        while not done:
            agent._last_obs = obs[None]
            action = np.full((1, 1), 0.3, np.float32)
            obs, reward, done, _, info = env.step(action[0])
            agent._store_transition(agent.replay_buffer, 2 * action - 1, obs[None],
                                    np.array([reward]), np.array([done]), [info])
        infos.append(info)
    assert [i["candidate"].policy for i in infos[:len(seeds)]] == seeds
    assert all(i["new"] for i in infos)
    for info in infos[:len(seeds)]:  # traced, unless the episode built the seed itself
        assert ("trace" in info) == info.get("seeded", False)
    assert infos[-1]["candidate"].policy not in seeds and not infos[-1].get("seeded")
    assert agent.episodes_seeded == sum(bool(i.get("seeded")) for i in infos) > 0
    assert agent.episodes_done == len(seeds) + 1 and agent.candidates_new == len(seeds) + 1
    # the seeds' traces are in the replay buffer: the first transition of each is its first
    # step's action, the one that picks the seed's first width
    first = [i for i, info in enumerate(infos) if info.get("seeded")][0]
    assert agent.replay_buffer.actions[first * len(space), 0, 0] == pytest.approx(
        2 * infos[first]["trace"][0][1] - 1)


def test_amc_agent_learns_from_the_policy_evaluated_not_the_one_it_built(setup):
    """An episode the env moved stores the trace's transitions (actions in SB3's scaled
    range), and counts as a repeat for the exploration noise."""
    _, space, pred, budget, ev = setup
    searcher = SEARCHERS["amc"]()(space, pred, budget, seed=0, warmup_episodes=0)
    env = searcher.make_env(lambda p, ep: ev.evaluate(p))
    agent = searcher.make_agent(env)
    obs, _ = env.reset()
    trace = [(np.full(obs.shape, i / 100, np.float32), i / len(space))
             for i in range(len(space))]
    for i in range(len(space)):  # the agent's own steps
        agent._last_obs = obs[None]
        info = {"new": True, "repeat": True, "trace": trace} if i == len(space) - 1 else {}
        agent._store_transition(agent.replay_buffer, np.full((1, 1), 0.9, np.float32),
                                obs[None], np.array([0.5]), np.array([i == len(space) - 1]),
                                [info])
    buf = agent.replay_buffer
    assert buf.pos == len(space)
    assert buf.observations[:len(space), 0] == pytest.approx(np.stack([o for o, _ in trace]))
    assert buf.actions[:len(space), 0, 0] == pytest.approx([2 * a - 1 for _, a in trace])
    assert agent.sigma_scaled == pytest.approx(1.0)  # a repeat: grows, capped at the start
    assert agent.candidates_new == 1 and agent.episodes_done == 1


def test_amc_moving_repeats_evaluates_a_new_policy_nearly_every_episode(setup, digits,
                                                                       tmp_path):
    """``repeats="move"`` (the default): N candidates take about N episodes, each followed by
    one DDPG update; served from the cache (AMC), the same N take more episodes and updates
    wherever the agent repeats a policy, as it does at a tight budget. Moving gets N distinct
    feasible candidates; replaying gets distinct feasible ones but can stall and stop at its
    episode cap short of N."""
    model, space, pred, _, _ = setup
    # tight, but with thousands of feasible policies whatever the table's shape: the latency
    # that 1 in 500 uniform random policies meet. A fixed fraction of the way from the
    # smallest policy to the unpruned model (0.05) depends on the measured table's shape: on
    # this machine 0.01 leaves so few feasible policies that moving runs out at 18
    rng = np.random.default_rng(0)
    draws = [pred.predict(Policy(tuple((g, int(rng.choice(space.group(g).choices)))
                                       for g in space.names))) for _ in range(2000)]
    tight = float(np.quantile(draws, 0.002))
    episodes, moved, got, n = {}, {}, {}, 32
    for repeats in ("move", "replay"):
        ev = Evaluator(model, digits, space, pred, budget_ms=tight, val_images=50, bn_batches=1)
        ctx, found = _ctx(ev, n, tmp_path / repeats, known=True)
        searcher = SEARCHERS["amc"]()(space, pred, tight, seed=0, warmup_episodes=2,
                                      repeats=repeats)
        assert searcher.options().get("repeats") == (repeats if repeats == "move" else None)
        searcher.run(ctx)
        assert len({c.policy for c in found}) == len(found) <= n
        assert all(c.feasible for c in found)
        ckpt = ctx.state_dir / json.loads((ctx.state_dir / "latest.json").read_text())["dir"]
        state = json.loads((ckpt / "state.json").read_text())
        episodes[repeats], moved[repeats] = state["episodes_done"], state["episodes_moved"]
        got[repeats] = len(found)
        if got[repeats] < n:  # gave up: only where the episodes ran out
            assert episodes[repeats] == searcher.max_episodes_per_trial * n, (episodes, got)
    assert got["move"] == n and episodes["move"] <= n + 1, (episodes, got)
    assert moved["replay"] == 0, moved
    # how many episodes repeat depends on the table's calibration (measured by the fixture),
    # and replaying can stall on a few policies (it did in CI: 16 in 160 episodes). Both runs
    # follow the same path up to the first repeat, so where replaying repeated a policy,
    # moving moved one, and it spent fewer episodes per new candidate
    if episodes["replay"] > got["replay"]:
        assert moved["move"] > 0, (episodes, moved, got)
        assert episodes["move"] / n < episodes["replay"] / got["replay"], (episodes, got)


def test_amc_noise_decays_on_new_policies_and_grows_on_repeats(setup):
    """After warm-up, an episode with a new policy decays the exploration noise by 0.95 down
    to the floor; an episode that repeats a policy raises it, up to the initial sigma."""
    _, space, pred, budget, ev = setup
    searcher = SEARCHERS["amc"]()(space, pred, budget, seed=0, warmup_episodes=1)
    env = searcher.make_env(lambda p, ep: ev.evaluate(p))
    agent = searcher.make_agent(env)
    obs, _ = env.reset()
    start, low, high = agent.sigma_scaled, agent.sigma_min_scaled, agent.sigma_max_scaled
    assert (start, low, high) == pytest.approx((1.0, 0.2, 1.0))  # 0.5 and 0.1 in [0, 1] units

    def episode(new):
        agent._last_obs = obs[None]
        agent._store_transition(agent.replay_buffer, np.zeros((1, 1), np.float32), obs[None],
                                np.array([0.5]), np.array([True]), [{"new": new}])
        return agent.sigma_scaled

    assert episode(True) == start  # the warm-up episode leaves it alone
    assert [episode(True) for _ in range(5)] == pytest.approx([0.95 ** k for k in range(1, 6)])
    assert agent.sigma_growth == pytest.approx(0.95 ** -4)
    assert episode(False) == pytest.approx(0.95)
    assert max(episode(False) for _ in range(50)) == pytest.approx(high)  # capped
    assert min(episode(True) for _ in range(100)) == pytest.approx(low)  # floored
    assert agent.episodes_done == 157 and agent.candidates_new == 106


def test_amc_actor_penalty_keeps_it_off_the_tanh_wall(setup):
    """A critic that rewards ever larger actions drives an unpenalised actor's pre-tanh
    activation far out, where tanh passes no gradient (the saturation that stuck an agent at
    budget 0.5); the default penalty holds it where the actor can still move back."""
    from stable_baselines3.common.logger import Logger

    _, space, pred, budget, ev = setup

    def pre_tanh_after_training(**options):
        searcher = SEARCHERS["amc"]()(space, pred, budget, seed=0, **options)
        agent = searcher.make_agent(searcher.make_env(lambda p, ep: ev.evaluate(p)))
        agent.set_logger(Logger(folder=None, output_formats=[]))
        rng = np.random.default_rng(0)
        for _ in range(agent.replay_buffer.buffer_size):
            obs = rng.uniform(0, 1, (1, 10)).astype(np.float32)
            act = rng.uniform(-1, 1, (1, 1)).astype(np.float32)
            agent.replay_buffer.add(obs, obs, act, act[0], np.array([True]), [{}])
        agent.train(gradient_steps=600, batch_size=64)
        obs = torch.as_tensor(agent.replay_buffer.observations[:, 0])
        with torch.no_grad():
            pre = agent.actor.mu[:-1](agent.actor.extract_features(
                obs, agent.actor.features_extractor))
        return float(pre.median())

    assert SEARCHERS["amc"]()(space, pred, budget).actor_reg > 0  # on by default
    assert "actor_reg" not in SEARCHERS["amc"]()(space, pred, budget, actor_reg=0).options()
    free, held = pre_tanh_after_training(actor_reg=0), pre_tanh_after_training()
    assert free > 0 and held > 0  # both learned that larger actions pay
    # the gradient tanh passes back: here ~0.07 held (just past the bound of 2) against
    # ~0.001 free, and falling as it trains on
    assert 1 - np.tanh(held) ** 2 > 20 * (1 - np.tanh(free) ** 2)


def _agents_on_one_buffer(setup, n: int) -> list:
    """``n`` fresh amc agents (the searcher's settings) whose replay buffers hold the same 300
    random terminal transitions, silent loggers: for comparing updates."""
    from stable_baselines3.common.logger import Logger

    _, space, pred, budget, ev = setup
    searcher = SEARCHERS["amc"]()(space, pred, budget, seed=0)
    rng = np.random.default_rng(0)
    rows = [(rng.uniform(0, 1, (1, 10)).astype(np.float32),
             rng.uniform(-1, 1, (1, 1)).astype(np.float32),
             rng.normal(0, 0.1, 1).astype(np.float32)) for _ in range(300)]
    agents = []
    for _ in range(n):
        agent = searcher.make_agent(searcher.make_env(lambda p, ep: ev.evaluate(p)))
        agent.set_logger(Logger(folder=None, output_formats=[]))
        for obs, act, reward in rows:
            agent.replay_buffer.add(obs, obs, act, reward, np.array([True]), [{}])
        agents.append(agent)
    return agents


def test_amc_update_runs_on_the_thread_count_its_recent_updates_ran_quicker_on(setup):
    """The agent's first updates alternate between the caller's threads and one, timed; then
    each runs on the count whose last few gradient steps were the quicker, except every
    RECHECK_EVERY-th, which times the other again. Both counts train the networks alike; with
    one thread given, or a count fixed, there is nothing to choose."""
    from autoprune.search.amc import RECHECK_EVERY, UPDATE_TRIALS

    space = setup[1]
    agents, ran = _agents_on_one_buffer(setup, 3), {}
    for agent, given in zip(agents, (2, 1, 1), strict=True):
        agent.update_threads = given
        inner = agent._train

        def _train(*args, agent=agent, inner=inner):
            ran.setdefault(id(agent), []).append(torch.get_num_threads())
            return inner(*args)

        agent._train = _train
    chooser, single, fixed = agents
    fixed.update_threads_fixed = 2
    n = 2 * UPDATE_TRIALS + RECHECK_EVERY + 3
    quick = []  # before each update: the count with the quicker recent median
    for agent in agents:
        np.random.seed(0)  # the replay buffer samples from numpy's global generator
        for _ in range(n):
            if agent is chooser and len(chooser._update_secs.get(1, ())) == UPDATE_TRIALS:
                medians = {k: float(np.median(v)) for k, v in chooser._update_secs.items()}
                quick.append(min((2, 1), key=medians.__getitem__))
            agent.train(len(space), 64)
        assert agent.update_s > 0 and sum(agent.update_counts.values()) == n
    runs = ran[id(chooser)]
    assert runs[:2 * UPDATE_TRIALS] == [2, 1] * UPDATE_TRIALS
    for i, q in enumerate(quick, start=2 * UPDATE_TRIALS):
        assert runs[i] == (3 - q if i % RECHECK_EVERY == RECHECK_EVERY - 1 else q), i
    assert all(len(v) == UPDATE_TRIALS for v in chooser._update_secs.values())
    assert ran[id(single)] == [1] * n and single.update_counts == {1: n}
    assert ran[id(fixed)] == [2] * n and fixed.update_counts == {2: n}
    assert torch.get_num_threads() == 1  # the agent acts on one: `train` gives it back
    for net in ("actor", "critic"):  # the same updates, whichever threads ran them
        for p, q, r in zip(*(getattr(a, net).parameters() for a in agents), strict=True):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-7)
            assert torch.allclose(p, r, rtol=1e-5, atol=1e-7)


def test_amc_hand_written_update_matches_autograd(setup):
    """The update amc runs (gradients written out, `FusedAdam` on them) moves both networks
    and both optimisers' state exactly as the same losses through autograd and torch's own
    fused Adam (`Optimizer.step`) do, the actor's penalty included."""
    from autoprune.search.amc import ACTOR_BOUND

    space = setup[1]
    agents = _agents_on_one_buffer(setup, 2)
    for agent in agents:
        with torch.no_grad():  # so that some pre-tanh activations are past the bound
            agent.actor.mu[-2].weight.mul_(40.0)
    hand, reference = agents
    for net, lr in ((reference.actor, 1e-4), (reference.critic, 1e-3)):  # torch's, not ours
        net.optimizer = torch.optim.Adam(net.parameters(), lr=lr, fused=True)
    obs = torch.as_tensor(hand.replay_buffer.observations[:300, 0])
    with torch.no_grad():
        pre = hand.actor.mu[:-1](obs)
    assert (pre.abs() > ACTOR_BOUND).any() and (pre.abs() < ACTOR_BOUND).any()
    before = {net: {k: v.clone() for k, v in getattr(hand, net).state_dict().items()}
              for net in ("actor", "critic")}
    for episode in range(4):
        np.random.seed(episode)  # the replay buffer samples from numpy's global generator
        hand._train(len(space), 64)
        np.random.seed(episode)
        reference._train_autograd(len(space), 64)
    assert hand._n_updates == reference._n_updates == 4 * len(space)
    for net in ("actor", "critic"):
        a, b = getattr(hand, net), getattr(reference, net)
        for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
            assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), (net, name)
            assert not torch.equal(p, before[net][name]), (net, name)  # it did train
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            sa, sb = a.optimizer.state[p], b.optimizer.state[q]
            assert float(sa["step"]) == float(sb["step"]) == 4 * len(space)
            assert torch.allclose(sa["exp_avg"], sb["exp_avg"], rtol=1e-4, atol=1e-7)
            assert torch.allclose(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-4, atol=1e-9)


def test_amc_samples_and_acts_as_sb3_does(setup):
    """amc's shortcuts past SB3's per-call work: its batch (`_sample`) is the same rows that
    ``replay_buffer.sample`` draws from numpy's generator, and its actor's action, computed
    through the hand-written forward, is the actor module's to the bit."""
    from stable_baselines3.common.logger import Logger

    _, space, pred, budget, ev = setup
    searcher = SEARCHERS["amc"]()(space, pred, budget, seed=0)
    agent = searcher.make_agent(searcher.make_env(lambda p, ep: ev.evaluate(p)))
    agent.set_logger(Logger(folder=None, output_formats=[]))
    rng = np.random.default_rng(0)
    for _ in range(150):
        obs = rng.uniform(0, 1, (1, 10)).astype(np.float32)
        act = rng.uniform(-1, 1, (1, 1)).astype(np.float32)
        agent.replay_buffer.add(obs, obs, act, rng.normal(0, 0.1, 1).astype(np.float32),
                                np.array([True]), [{}])
    for seed in range(3):
        np.random.seed(seed)
        ours = agent._sample(64)
        after = np.random.random()  # and the generator is left where SB3 leaves it
        np.random.seed(seed)
        data = agent.replay_buffer.sample(64)
        assert np.random.random() == after
        for a, b in zip(ours, (data.observations, data.actions, data.rewards), strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
        assert len({tuple(r) for r in ours[0].tolist()}) > 32  # rows drawn, not one repeated
    agent.episodes_done = agent.warmup_episodes  # past the random warm-up: the actor acts
    agent.sigma_scaled = 1e-9
    for row in agent.replay_buffer.observations[:20]:
        agent._last_obs = row
        _, scaled = agent._sample_action(0)
        with torch.no_grad():
            want = agent.actor(torch.as_tensor(row)).numpy()
        assert np.allclose(scaled, want, atol=1e-6)
    obs = torch.as_tensor(agent.replay_buffer.observations[:150, 0])
    with torch.no_grad():
        assert torch.equal(torch.tanh(agent._hand_grads()[0].forward(obs)[1][-1]),
                           agent.actor(obs))


def test_amc_checkpoint_is_on_disk_before_latest_points_to_it(setup, tmp_path, monkeypatch):
    """A checkpoint's files are flushed to the disk (fsync) before ``latest.json`` is renamed
    to point at them, and every file renamed into place was flushed first: a power cut, not
    only a kill, leaves the old checkpoint or the new one whole. The checkpoint then loads."""
    from pathlib import Path

    import autoprune._io as io
    from autoprune.search.amc import AMCSearcher, make_agent_class

    _, space, pred, budget, ev = setup
    searcher = SEARCHERS["amc"]()(space, pred, budget, seed=0)
    env = searcher.make_env(lambda p, ep: ev.evaluate(p))
    agent = searcher.make_agent(env)
    events = []
    fsync, replace = io.fsync_path, os.replace

    def spy_fsync(path):
        events.append(("fsync", Path(path).name))
        fsync(path)

    def spy_replace(src, dst):
        events.append(("replace", Path(dst).name, Path(src).name))
        replace(src, dst)

    monkeypatch.setattr(io, "fsync_path", spy_fsync)
    monkeypatch.setattr(io.os, "replace", spy_replace)
    AMCSearcher._save(agent, tmp_path)
    names = [e[1] for e in events]
    switch = events.index(next(e for e in events if e[:2] == ("replace", "latest.json")))
    assert {"agent.zip", "replay.pkl", "state.json"} <= set(names[:switch])
    for i, event in enumerate(events):
        if event[0] == "replace":  # its temp file flushed just before, its folder just after
            assert events[i - 1] == ("fsync", event[2])
            assert events[i + 1][0] == "fsync" and events[i + 1][1] in (
                tmp_path.name, json.loads((tmp_path / "latest.json").read_text())["dir"])
    ckpt = tmp_path / json.loads((tmp_path / "latest.json").read_text())["dir"]
    loaded = make_agent_class().load(ckpt / "agent.zip", env=env, device="cpu")
    loaded.load_replay_buffer(ckpt / "replay.pkl")
    for a, b in zip(agent.actor.parameters(), loaded.actor.parameters(), strict=True):
        assert torch.equal(a, b)


def test_fused_adam_is_torchs_fused_adam_and_shares_its_checkpoints():
    """amc's optimiser steps as `torch.optim.Adam(fused=True)` does, without importing
    torch._dynamo (checked in a fresh process), and each loads the other's `state_dict`:
    checkpoints made with either resume with either."""
    from autoprune.search.amc import FusedAdam

    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 1))
            for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    ours = FusedAdam(nets[0].parameters(), lr=1e-2)
    torchs = torch.optim.Adam(nets[1].parameters(), lr=1e-2, fused=True)
    x = torch.randn(32, 5)
    for _ in range(5):
        for net, opt in zip(nets, (ours, torchs), strict=True):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(*(net.parameters() for net in nets), strict=True):
        assert torch.equal(a, b)
    # torch's state into ours: both then take the same step again
    fresh = FusedAdam(nets[0].parameters(), lr=0.5)
    fresh.load_state_dict(torchs.state_dict())
    assert fresh.param_groups[0]["lr"] == 1e-2
    for a, b in zip(fresh.state.values(), torchs.state.values(), strict=True):
        assert float(a["step"]) == float(b["step"]) == 5.0
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    # ours into torch's, and a state saved before any step (SB3 checkpoints in warm-up)
    back = torch.optim.Adam(nets[1].parameters(), lr=0.5, fused=True)
    back.load_state_dict(ours.state_dict())
    assert float(back.state[next(nets[1].parameters())]["step"]) == 5.0
    unstepped = FusedAdam(nets[0].parameters())
    unstepped.load_state_dict(torch.optim.Adam(nets[1].parameters()).state_dict())
    assert all(float(s["step"]) == 0.0 for s in unstepped.state.values())
    with pytest.raises(ValueError, match="does not match"):
        FusedAdam(nets[0][0].parameters()).load_state_dict(torchs.state_dict())
    code = ("import sys, torch; from autoprune.search.amc import FusedAdam; "
            "n = torch.nn.Linear(2, 1); o = FusedAdam(n.parameters()); "
            "n(torch.ones(1, 2)).sum().backward(); o.step(); o.state_dict(); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("sampler", ["cmaes", "tpe"])
def test_single_objective_samplers(setup, tmp_path, sampler):
    _, space, pred, budget, ev = setup
    searcher = SEARCHERS["evolution"]()(space, pred, budget, seed=0, sampler=sampler)
    ctx, found = _ctx(ev, 5, tmp_path, sampler)
    searcher.run(ctx)
    assert len(found) == 5 and all(c.feasible for c in found)
    with pytest.raises(UserError, match="unknown `--sampler`"):
        SEARCHERS["evolution"]()(space, pred, budget, sampler="grid")


def test_amc_acc_log_latency_reward(setup):
    from autoprune.search.amc import PruningEnv

    _, space, pred, budget, ev = setup
    env = PruningEnv(space, pred, budget, lambda p, ep: ev.evaluate(p), reward="acc-log-latency")
    env.reset()
    done, reward, info = False, 0.0, {}
    while not done:
        _, reward, done, _, info = env.step(np.array([1.0], dtype=np.float32))
    cand = info["candidate"]
    assert reward == pytest.approx(-(1 - cand.val_acc) * np.log(cand.latency_ms))


# ------------------------------------------------------------------ CLI: kill and resume
def _search_args(ckpt, tables, runs, searcher, trials, study, budget, check=0, more=()):
    """``check``: `--budget-check` (0 here by default: two studies made apart then search the
    same budget, where a test compares them). The measured check watches the machine for 1 s,
    not 10 (the chain of `test_deploy` runs the default)."""
    extra = {"evolution": ["--population", "4"], "amc": ["--warmup-episodes", "3"]}
    return ["search", "--target-device", "cpu-ort", "--weights", ckpt, "--tables", tables,
            "--latency-budget", budget, "--searcher", searcher, "--trials", str(trials),
            "--study", study, "--runs", runs, "--val-images", "200", "--quiet",
            "--budget-check", str(check), "--verify-seconds", "1", *extra.get(searcher, []),
            *more]


def test_a_new_study_checks_its_budget_on_the_device_and_a_resume_keeps_it(cli_env, tmp_path):
    """`--budget-check K`: K policies the table puts at the budget are measured on the device
    (onnxruntime here) and the search's budget, in predicted ms, is the table's scaled by the
    median of predicted over measured; the study keeps it, and a resume searches the same
    budget without measuring again."""
    ckpt, tables, budget = cli_env
    runs = tmp_path / "runs"
    args = _search_args(ckpt, tables, runs, "random", 4, "c", budget, check=3)
    run_cli(*args, check=True)
    config = json.loads((runs / "c" / "config.json").read_text())
    made = config["budget_check"]
    ratios = made["measured_over_predicted"]
    assert len(ratios) == 3 and all(r > 0 for r in ratios)
    if not made["clamped"]:
        assert made["scale"] == pytest.approx(1 / statistics.median(ratios))
    assert 1 / 1.25 <= made["scale"] <= 1.25
    assert config["budget_ms"] == round(made["table_budget_ms"] * made["scale"], 9)
    first = _lines(runs / "c" / "candidates.jsonl")
    assert all(json.loads(x)["latency_ms"] <= config["budget_ms"] * (1 + 1e-9) for x in first)
    # resumed with more trials (and another K, which a made study ignores): same budget
    args[args.index("--trials") + 1], args[args.index("--budget-check") + 1] = "6", "5"
    run_cli(*args, check=True)
    assert json.loads((runs / "c" / "config.json").read_text()) == config
    after = _lines(runs / "c" / "candidates.jsonl")
    assert after[:len(first)] == first and len(after) == 6
    # without a check the table's own budget is searched, and the config says so
    run_cli(*_search_args(ckpt, tables, runs, "random", 2, "t", budget), check=True)
    plain = json.loads((runs / "t" / "config.json").read_text())
    assert plain["budget_check"] is None
    assert plain["budget_ms"] == round(made["table_budget_ms"], 9)


def test_budget_check_scales_the_budget_by_what_the_device_measures():
    """`check_budget` on policies `near_budget_policies` draws: the budget is scaled by the
    median of predicted over measured, within 1/1.25 to 1.25, and never below the space's
    floor. The device here is the predictor itself, off by a known factor, so the scale can
    be checked exactly. The shipped ResNet-20 table, at a budget 0.3 of the way from the
    smallest policy to the unpruned one, where every random draw needs projecting onto it: a
    draw that fits as drawn is kept as drawn, and on the digits fixture's noisy table some fell
    under 0.8 x budget."""
    from autoprune.evaluate import check_budget, near_budget_policies

    pred = _shipped_predictor("resnet20")
    space = pred.space
    budget = pred.min_latency() + 0.3 * (pred.max_latency() - pred.min_latency())
    policies = near_budget_policies(space, pred, budget, 6, seed=0)
    assert len(set(policies)) == 6
    assert all(0.8 * budget <= pred.predict(p) <= budget * (1 + 1e-9) for p in policies)
    assert policies == near_budget_policies(space, pred, budget, 6, seed=0)  # seeded

    def device(factor):
        return lambda p: {"over_budget": factor * pred.predict(p) / budget}

    for factor, scale in ((0.95, 1 / 0.95), (1.1, 1 / 1.1), (2.0, 1 / 1.25), (0.5, 1.25)):
        got = check_budget(policies, pred, budget, device(factor), min_seconds=0)
        assert got.scale == pytest.approx(scale)
        assert got.clamped == (factor in (2.0, 0.5))
        assert got.measured_over_predicted == pytest.approx([factor] * 6)
    # a device slower than the table by 1.2 at a budget just above the floor: held there
    got = check_budget(policies, pred, budget, device(1.2), floor_ms=0.99 * budget,
                       min_seconds=0)
    assert got.scale == pytest.approx(0.99) and got.clamped
    # a busy spell slows half the policies in the first pass and the others in the second:
    # each keeps its quickest, so the spell moves nothing (one pass: the median moves)
    calls = []

    def busy(p):
        calls.append(p)
        slow = (len(calls) <= 6) == (len(calls) % 2 == 0)
        return {"over_budget": (1.3 if slow else 1.05) * pred.predict(p) / budget}

    got = check_budget(policies, pred, budget, busy, min_seconds=0)
    assert len(calls) == 12 and got.measured_over_predicted == pytest.approx([1.05] * 6)
    calls.clear()
    assert check_budget(policies, pred, budget, busy, passes=1, min_seconds=0).scale < 1 / 1.1


def test_budget_check_passes_go_on_until_each_policy_is_measured_in_a_quiet_moment():
    """A slow spell that outlasts the passes: the main job's check once measured all 8
    policies at 1.2 to 1.36 x the table in both passes, the machine in a slow state that cost
    them 1.4x and the unpruned model beside each 1.14x. The unpruned reference measured beside
    each policy tells the state: passes go on until every policy has a measurement whose
    reference ran within 5% of the quickest, and it keeps its quickest such measurement,
    counted against the quickest reference. A device slow for all of the passes looks the
    same as a slow device, so the passes also span ``min_seconds``, for a quick moment to
    show. A device that keeps a policy slow to the end leaves it ``unquiet``; a budget in ms
    has no reference, so its passes are all it takes."""
    import time

    from autoprune.evaluate import check_budget, near_budget_policies

    pred = _shipped_predictor("resnet20")
    budget = pred.min_latency() + 0.3 * (pred.max_latency() - pred.min_latency())
    policies = near_budget_policies(pred.space, pred, budget, 6, seed=0)
    fraction = budget / pred.max_latency()
    quick_ref = 0.5  # ms, the unpruned model on a quiet machine
    true = 1.02  # each policy's measured ÷ predicted on a quiet machine

    def device(slow, seconds=0.0):
        """budget_measurer's records, each policy measured ``true`` x its prediction (1.4x
        that and the reference 1.14x where ``slow(call number, policy, seconds since the
        first call)``), over the quietest reference so far; each call takes ``seconds``."""
        calls, quietest, t0 = [], [float("inf")], []

        def measure(p):
            t0[:] = t0 or [time.perf_counter()]
            time.sleep(seconds)
            calls.append(p)
            k = 1.4 if slow(len(calls), p, time.perf_counter() - t0[0]) else 1.0
            ref = quick_ref * (1.14 if k > 1 else 1.0)
            ms = true * pred.predict(p) / budget * fraction * quick_ref * k
            quietest[0] = min(quietest[0], ref)
            return {"median_ms": ms, "reference_ms": ref, "budget_reference_ms": quietest[0],
                    "over_budget": ms / (fraction * quietest[0])}

        return measure, calls

    # the first pass and half the second slow: a third pass for the three policies still
    # without a quiet measurement, counted against the quick reference the second pass found
    measure, calls = device(lambda n, p, t: n <= 6 + 3)
    got = check_budget(policies, pred, budget, measure, min_seconds=0)
    assert got.passes == 3 and len(calls) == 18 and got.unquiet == 0
    assert got.measured_over_predicted == pytest.approx([true] * 6)
    assert got.scale == pytest.approx(1 / true) and not got.clamped
    # slow for both passes: nothing looks quieter, and the budget is held at 1/1.25 ...
    slow_first = device(lambda n, p, t: t < 0.1, seconds=0.002)[0]
    two = check_budget(policies, pred, budget, slow_first, min_seconds=0)
    assert two.passes == 2 and two.unquiet == 0 and two.clamped and two.scale == 0.8
    # ... unless the passes span long enough for the quick state to show
    measure, calls = device(lambda n, p, t: t < 0.1, seconds=0.002)
    got = check_budget(policies, pred, budget, measure, min_seconds=0.2)
    assert got.passes >= 0.2 / (6 * 0.002 * 2) and got.unquiet == 0
    assert got.measured_over_predicted == pytest.approx([true] * 6)
    # one policy slow to the end: passes stop at max_seconds, and it counts as measured
    stuck = policies[0]
    got = check_budget(policies, pred, budget, device(lambda n, p, t: p == stuck)[0],
                       min_seconds=0, max_seconds=0.05)
    assert got.unquiet == 1 and got.passes >= 2
    assert got.measured_over_predicted[0] == pytest.approx(true * 1.4)
    assert got.measured_over_predicted[1:] == pytest.approx([true] * 5)
    # a budget in ms: no reference, `passes` passes
    calls = []

    def in_ms(p):
        calls.append(p)
        return {"over_budget": 1.3 * pred.predict(p) / budget}

    got = check_budget(policies, pred, budget, in_ms, min_seconds=0)
    assert got.passes == 2 and len(calls) == 12 and got.unquiet == 0

def _lines(path):
    return path.read_text().splitlines() if path.is_file() else []


def _spawn(args, stderr=subprocess.DEVNULL):
    """The CLI in a subprocess on one thread, left running."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "autoprune.cli", "--threads", "1",
                             *map(str, args)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=stderr, text=True)


def _kill_midway(args, log, at_least):
    proc = _spawn(args)
    deadline = time.monotonic() + 300
    while len(_lines(log)) < at_least:
        assert proc.poll() is None, "search ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return _lines(log)


@pytest.mark.slow
@pytest.mark.parametrize("searcher,trials,kill_at", [("random", 14, 4), ("evolution", 14, 6),
                                                     ("amc", 28, 23), ("amc/random", 28, 23)])
def test_resume_after_sigkill(cli_env, tmp_path, searcher, trials, kill_at):
    """``amc/random``: amc with AMC's random warm-up in place of evolution's seeds."""
    ckpt, tables, budget = cli_env
    searcher, _, warmup = searcher.partition("/")
    more = ("--amc-warmup-policies", warmup) if warmup else ()
    if searcher == "amc":  # a tighter budget: more episodes repeat a policy, and move
        budget = mid_budget(ckpt, tables, at=0.05)
    runs = tmp_path / "runs"
    args = _search_args(ckpt, tables, runs, searcher, trials, "s", budget, more=more)
    log = runs / "s" / "candidates.jsonl"
    before = _kill_midway(args, log, kill_at)
    if searcher == "amc":  # killed past its first checkpoint (every 20 episodes): resumes it
        assert (runs / "s" / "amc" / "latest.json").is_file()
    proc = run_cli(*args, check=True)
    after = _lines(log)
    assert after[:len(before)] == before  # nothing logged is lost or rewritten
    policies = [json.dumps(json.loads(line)["policy"], sort_keys=True) for line in after]
    assert len(policies) == len(set(policies))  # none duplicated
    assert len(after) <= trials
    new = int(re.search(r"evaluated (\d+) new", proc.stdout)[1])
    refs = json.loads((runs / "s" / "reference.json").read_text())
    fresh_refs = sum(json.dumps(r["policy"], sort_keys=True) not in policies
                     for r in refs.values())  # evolution's seed *is* the uniform policy
    assert new == len(after) - len(before) + fresh_refs  # nothing evaluated twice
    summary = json.loads((runs / "s" / "summary.json").read_text())
    assert summary["best"]["feasible"]
    if searcher == "evolution":
        import optuna

        study = optuna.load_study(study_name="s", storage=f"sqlite:///{runs / 's' / 'optuna.db'}")
        states = [t.state.name for t in study.trials]
        assert states.count("COMPLETE") == trials and "RUNNING" not in states
    if searcher == "random":
        assert len(after) == len({json.loads(x)["trial"] for x in after})
    if searcher == "amc":
        # the resumed agent replays the same episodes: the log equals an uninterrupted run's
        run_cli(*_search_args(ckpt, tables, runs, searcher, trials, "clean", budget, more=more),
                check=True)
        clean = _lines(runs / "clean" / "candidates.jsonl")
        strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "eval_s"}  # noqa: E731
                               for x in lines]
        assert strip(after) == strip(clean)
        # ... including episodes that repeated a policy and moved to a new one, where the
        # replay must move as the original did (the log already holds both policies then)
        states = []
        for name in ("s", "clean"):
            folder = runs / name / "amc"
            ckpt = folder / json.loads((folder / "latest.json").read_text())["dir"]
            states.append(json.loads((ckpt / "state.json").read_text()))
        same = ("episodes_done", "episodes_moved", "episodes_seeded", "candidates_new",
                "baseline", "sigma_scaled", "rng")  # not the update's timings
        resumed, uninterrupted = ({k: st[k] for k in same} for st in states)
        assert resumed == uninterrupted
        # evolution's seeds take 11 of the 28 episodes; the 17 left repeated a policy (and
        # moved) 0 to 11 times over 7 runs, depending on the table profiled in each. Without
        # the seeds, 10 to 19 in 3 runs: there, some must have moved
        assert resumed["episodes_moved"] > 0 or not warmup, resumed


_POP_WAITING = """
import json, sys, time
from types import SimpleNamespace
import optuna
from autoprune.search.evolution import open_optuna_study
ctx = SimpleNamespace(storage_url=sys.argv[1], study_name="q", shared_storage=True)
study = open_optuna_study(ctx, optuna.samplers.RandomSampler(), directions=["maximize"])
while time.time() < float(sys.argv[2]):
    pass
taken = []
while (trial_id := study._pop_waiting_trial_id()) is not None:
    taken.append(trial_id)
print(json.dumps(taken))
"""


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_workers_sharing_a_study_never_take_the_same_enqueued_trial(tmp_path, kind, request):
    """Optuna hands out an enqueued trial by reading that it waits and then marking it running;
    SQLite ignores the row lock (``SELECT ... FOR UPDATE``) that makes that atomic on
    PostgreSQL, so without a transaction that takes the write lock first, two workers took the
    same trials (9 of 60 here) and one of them had its result refused."""
    from types import SimpleNamespace

    import optuna

    from autoprune.search.evolution import open_optuna_study

    url = _rdb_url(kind, tmp_path, request, "q")
    ctx = SimpleNamespace(storage_url=url, study_name="q", shared_storage=True)
    study = open_optuna_study(ctx, optuna.samplers.RandomSampler(), directions=["maximize"])
    for i in range(60):
        study.enqueue_trial({"x": i})
    start = time.time() + 3  # both past their imports, then popping at once
    procs = [subprocess.Popen([sys.executable, "-c", _POP_WAITING, url, str(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    a, b = (json.loads(out) for out, _ in outs)
    assert not set(a) & set(b) and len(a) + len(b) == 60


_OPEN_AND_SEED = """
import sys, time
from types import SimpleNamespace
import optuna
from autoprune.search.evolution import check_shared_config, open_optuna_study
ctx = SimpleNamespace(storage_url=sys.argv[1], study_name="q", shared_storage=True)
while time.time() < float(sys.argv[2]):
    pass
check_shared_config(sys.argv[1], "q", {}, wait_s=0)  # the first to open an empty database
seed = lambda s: [s.enqueue_trial({"x": i}) for i in range(5)]
open_optuna_study(ctx, optuna.samplers.RandomSampler(), directions=["maximize"], on_create=seed)
"""


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_workers_opening_a_shared_study_together_seed_it_once(tmp_path, kind, request):
    """The evolution seeds of a shared study are enqueued by the worker that created it: three
    workers opening a new study at once leave one set of seeds, not three. Each first checks
    the study's config (`check_shared_config`), which makes Optuna's tables in an empty
    database: all three race to make them, and none fails."""
    import optuna

    url = _rdb_url(kind, tmp_path, request, "q")
    start = time.time() + 3
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN_AND_SEED, url, str(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in outs]
    trials = optuna.load_study(study_name="q", storage=url).trials
    assert sorted(t.system_attrs["fixed_params"]["x"] for t in trials) == list(range(5))


def test_a_worker_that_would_search_another_study_in_shared_storage_is_refused(cli_env,
                                                                              tmp_path):
    """A shared Optuna study keeps the config of the worker that made it; a worker whose config
    differs (here another `--seed`, from a runs folder of its own, where no config.json of
    the study's could refuse it) is refused before it makes its study folder, and so is one
    with the same options in a runs folder of its own. One in the maker's runs folder joins."""
    import optuna

    ckpt, tables, budget = cli_env
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    first = [*_search_args(ckpt, tables, tmp_path / "runs1", "evolution", 3, "s", budget),
             "--storage", url]
    run_cli(*first, check=True)
    made = optuna.load_study(study_name="s", storage=url).user_attrs["autoprune:config"]
    assert made["seed"] == 0 and made["budget_ms"] > 0
    other = [*_search_args(ckpt, tables, tmp_path / "runs2", "evolution", 3, "s", budget),
             "--storage", url]
    assert_user_error(run_cli(*other, "--seed", "1"), "shared study 's'",
                      "a different seed (0 vs now 1)", "share one runs folder")
    assert_user_error(run_cli(*other), "shared study 's'", "made in another runs folder",
                      f"{str(tmp_path / 'runs2')!r} has no study 's'")
    assert not (tmp_path / "runs2" / "s").exists()
    run_cli(*first[:first.index("--trials") + 1], "4", *first[first.index("--trials") + 2:],
            check=True)  # the maker's runs folder: it joins, and runs the 4th trial
    assert len(optuna.load_study(study_name="s", storage=url).trials) >= 4


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_two_workers_share_a_study_through_storage(cli_env, tmp_path, kind, request):
    """`--storage URL`: two processes run one evolution study together (heartbeats on; WAL on
    SQLite), in a SQLite file and on a real PostgreSQL server. Started together, each checking
    the budget on the device, they search one budget: the first to make the study checks it,
    the other takes its check (each measuring its own, the two had searched budgets apart)."""
    import optuna
    from optuna.trial import TrialState

    ckpt, tables, budget = cli_env
    runs, trials = tmp_path / "runs", 12
    url = _rdb_url(kind, tmp_path, request, "shared")
    args = [*_search_args(ckpt, tables, runs, "evolution", trials, "s", budget, check=2),
            "--storage", url]
    procs = [_spawn(args, stderr=subprocess.PIPE) for _ in range(2)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    study = optuna.load_study(study_name="s", storage=url)
    states = [t.state for t in study.trials]
    assert "RUNNING" not in {s.name for s in states}
    # each worker stops once the study holds N complete trials; one in flight may finish too
    assert trials <= states.count(TrialState.COMPLETE) <= trials + 1
    assert any(t.system_attrs.get("fixed_params") for t in study.trials)  # the uniform seed
    if kind == "sqlite":
        with sqlite3.connect(tmp_path / "shared.db") as con:
            assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    config = json.loads((runs / "s" / "config.json").read_text())
    assert config["budget_check"] is not None
    # every trial's constraint is its latency over the budget its worker searched
    by_latency = {json.dumps(c["policy"], sort_keys=True): c["latency_ms"]
                  for c in map(json.loads, _lines(runs / "s" / "candidates.jsonl"))}
    searched = {round(by_latency[json.dumps(t.user_attrs["policy"], sort_keys=True)]
                      - t.system_attrs["constraints:latency_over_budget_ms"], 9)
                for t in study.trials if t.state == TrialState.COMPLETE}
    assert searched == {round(config["budget_ms"], 9)}, searched
    # the worker that wrote the results last had read the other's candidates
    logged = _lines(runs / "s" / "candidates.jsonl")
    summary = json.loads((runs / "s" / "summary.json").read_text())
    assert summary["candidates"] == len(logged)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_trial_taken_by_a_worker_that_died_before_its_first_heartbeat_is_retried(
        tmp_path, kind, request):
    """A shared study's trial is running from the moment a worker takes it, before its first
    heartbeat: Optuna's stale check never fails such a trial. `fail_trials_without_heartbeat`
    does, once it is older than the grace period, and queues it again with its enqueued
    parameters (an evolution seed is not lost); a trial with a heartbeat is left to Optuna."""
    import optuna
    from optuna.trial import TrialState

    from autoprune.search.evolution import fail_trials_without_heartbeat

    storage = optuna.storages.RDBStorage(
        _rdb_url(kind, tmp_path, request, "nohb"), heartbeat_interval=10, grace_period=30,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
            max_retry=3))
    study = optuna.create_study(storage=storage, study_name="s", directions=["maximize"])
    for x in (1, 2):
        study.enqueue_trial({"x": x})
    dead = study._pop_waiting_trial_id()  # taken, and its worker gone before any heartbeat
    alive = study._pop_waiting_trial_id()
    storage.record_heartbeat(alive)
    time.sleep(0.05)
    assert fail_trials_without_heartbeat(study, grace_s=3600) == []  # not yet past the grace
    optuna.storages.fail_stale_trials(study)  # Optuna's own check: passes over it
    assert study._storage.get_trial(dead).state == TrialState.RUNNING
    dead_number = study._storage.get_trial(dead).number
    assert fail_trials_without_heartbeat(study, grace_s=0) == [dead_number]
    assert fail_trials_without_heartbeat(study, grace_s=0) == []  # once
    trials = {t._trial_id: t for t in study.get_trials(deepcopy=False)}
    assert trials[dead].state == TrialState.FAIL and trials[alive].state == TrialState.RUNNING
    retry = [t for t in trials.values() if t.system_attrs.get("failed_trial") == dead_number]
    assert len(retry) == 1 and retry[0].state == TrialState.WAITING
    assert retry[0].system_attrs["fixed_params"] == {"x": 1}


@pytest.mark.slow
def test_a_killed_workers_running_trial_is_taken_over_by_another(cli_env, tmp_path, request):
    """A worker of a shared study killed in the middle of a trial leaves it RUNNING in the
    storage. Its heartbeat stops, and once the grace period has passed the next worker marks
    it failed and runs its parameters again, so no trial stays RUNNING and the study still
    ends with ``--trials`` complete ones, each policy logged once. On PostgreSQL, the storage
    for workers on several machines (SQLite runs the same code: the test above covers both;
    this one waits out the 30 s grace period)."""
    import optuna
    from optuna.trial import TrialState

    from autoprune.search.evolution import HEARTBEAT_GRACE_S

    ckpt, tables, budget = cli_env
    # more trials than evolution's seeds (13 here), which wait in the storage ahead of the retry
    runs, trials = tmp_path / "runs", 24
    url = _rdb_url("postgresql", tmp_path, request, "hb")
    args = [*_search_args(ckpt, tables, runs, "evolution", trials, "s", budget),
            "--storage", url]
    log = runs / "s" / "candidates.jsonl"
    first = _spawn(args)
    deadline = time.monotonic() + 300
    try:
        while True:  # frozen, the worker cannot finish the trial the storage shows running
            assert first.poll() is None, "the worker finished before it could be killed"
            assert time.monotonic() < deadline, "the worker logged too few candidates"
            if len(_lines(log)) >= 3:
                first.send_signal(signal.SIGSTOP)
                study = optuna.load_study(study_name="s", storage=url)
                running = [t for t in study.trials if t.state == TrialState.RUNNING]
                if running:
                    break
                first.send_signal(signal.SIGCONT)
            time.sleep(0.05)
    finally:
        first.kill()
        first.wait(timeout=60)
    stale = running[0]
    time.sleep(HEARTBEAT_GRACE_S + 1)  # its last heartbeat is older than the grace period
    second = _spawn(args, stderr=subprocess.PIPE)
    err = second.communicate(timeout=600)[1]
    assert second.returncode == 0, err
    study = optuna.load_study(study_name="s", storage=url)
    by_number = {t.number: t for t in study.trials}
    assert by_number[stale.number].state == TrialState.FAIL
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == stale.number]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    # the kill can land between two of the trial's suggestions: what it had is kept
    assert stale.params.items() <= retried[0].params.items()
    states = [t.state for t in study.trials]
    assert TrialState.RUNNING not in states
    assert trials <= states.count(TrialState.COMPLETE) <= trials + 1
    policies = [json.dumps(json.loads(line)["policy"], sort_keys=True) for line in _lines(log)]
    assert len(policies) == len(set(policies))
    assert json.loads((runs / "s" / "summary.json").read_text())["candidates"] == len(policies)


def test_changed_config_is_refused(cli_env, tmp_path):
    ckpt, tables, budget = cli_env
    runs = tmp_path / "runs"
    run_cli(*_search_args(ckpt, tables, runs, "random", 2, "s", budget), check=True)
    saved = (runs / "s" / "candidates.jsonl").read_text()
    other = f"{(float(budget) + 1) / 2:.3f}"
    assert_user_error(run_cli(*_search_args(ckpt, tables, runs, "random", 2, "s", other)),
                      "different budget", "pick another `--study`")
    assert_user_error(run_cli(*_search_args(ckpt, tables, runs, "uniform", 2, "s", budget)),
                      "different")
    assert (runs / "s" / "candidates.jsonl").read_text() == saved
    # more trials on the same study is a resume, not a change
    run_cli(*_search_args(ckpt, tables, runs, "random", 4, "s", budget), check=True)
    assert len(_lines(runs / "s" / "candidates.jsonl")) >= 3
    proc = run_cli("report", "--study", "s", "--runs", runs, "--json", check=True)
    assert json.loads(proc.stdout)["best"]["feasible"]


def _stale_tables(tables, dest, factor):
    """A copy of ``tables`` whose calibration predicts every latency at ``factor`` (< 1) of what
    this machine measures: what a table built on a faster machine, or before a slowdown, looks
    like."""
    import shutil

    shutil.copytree(tables, dest)
    path = dest / "cpu-ort" / "resnet20.json"
    table = json.loads(path.read_text())
    for cal in table["calibration"].values():
        cal["scale"] *= factor
        cal["offset_ms"] *= factor
    path.write_text(json.dumps(table))
    return dest


def test_search_ends_with_a_measured_check(cli_env, tmp_path):
    """The best candidates are measured on the device, most accurate first, until one is
    within the budget x 1.05; the predicted best that the device says is too slow is passed
    over. With a stale table (half the real latency) the predictor calls every policy
    feasible, so the most accurate ones are the widest, and they measure over budget."""
    ckpt, tables, _ = cli_env
    pred = json.loads(run_cli("predict", "--target-device", "cpu-ort", "--weights", ckpt,
                              "--tables", tables, "--json", check=True).stdout)
    # halfway between the smallest policy and the unpruned model, and at least 1.2 x under
    # the unpruned model as measured now: the table was calibrated earlier, and this shared
    # machine's speed drifts (seen: the unpruned model measured at 0.86 x the halfway budget)
    full = json.loads(run_cli("measure", "--target-device", "cpu-ort", "--weights", ckpt,
                              "--tables", tables, "--json", check=True).stdout)["median_ms"]
    budget_ms = min((pred["smallest_ms"] + pred["full_ms"]) / 2, full / 1.2)
    # the stale table predicts at half the fresh one's latency, or less where the fresh one
    # puts the smallest policy under 0.6 of the unpruned model (the digits model's table put it
    # at 0.38 to 0.73 in 8 builds here): the uniform part below needs the stale table's
    # unpruned model well under the fresh table's smallest policy, and under the smallest
    # policy as measured now (in CI beside another job, a uniform fallback measured at 0.78 of
    # a budget 1.2 x under the fresh table's smallest policy: the table ran slower than now)
    space = json.loads(run_cli("space", "--target-device", "cpu-ort", "--weights", ckpt,
                               "--json", check=True).stdout)
    smallest = SearchSpace.from_dict(space).smallest().save(tmp_path / "smallest.json")
    small = json.loads(run_cli("measure", "--target-device", "cpu-ort", "--weights", ckpt,
                               "--tables", tables, "--policy", smallest, "--json",
                               check=True).stdout)["median_ms"]
    factor = min(0.5, pred["smallest_ms"] / pred["full_ms"] / 1.2, small / pred["full_ms"] / 1.2)
    stale, runs = _stale_tables(tables, tmp_path / "stale", factor), tmp_path / "runs"
    # `--budget-check 0`: the search trusts the stale table, as one made before the check
    # did (the check would tighten its budget by 1.25, and the end check has less to do)
    args = ["search", "--target-device", "cpu-ort", "--weights", ckpt, "--tables", stale,
            "--latency-budget-ms", f"{budget_ms:.6f}", "--runs", runs, "--val-images", "200",
            "--quiet", "--budget-check", "0", "--verify-seconds", "1"]

    # uniform: at a budget just over the stale table's unpruned model (``factor`` of the fresh
    # table's) its best is the unpruned model, and its fallbacks are cheaper uniform policies;
    # the fresh table puts every policy of the space well over that budget, so all of them
    # measure over it: nothing fits, the predicted best stands and the user is warned
    budget_u = pred["full_ms"] * factor * 1.001
    assert pred["smallest_ms"] > 1.15 * budget_u
    i = args.index("--latency-budget-ms")
    uniform_args = [*args[:i + 1], f"{budget_u:.6f}", *args[i + 2:]]
    proc = run_cli(*uniform_args, "--searcher", "uniform", "--study", "u", check=True)
    n_uniform = len(_lines(runs / "u" / "candidates.jsonl"))
    assert 2 <= n_uniform <= 3  # 3 unless the floor leaves room for one fallback only
    best = json.loads((runs / "u" / "best_policy.json").read_text())
    assert best["measured_over_budget"] > 1.05
    assert f"none of the {n_uniform} candidates measured" in " ".join(proc.stderr.split())
    assert "no candidate within" in proc.stdout
    # and the unpruned model, measured at 1 / factor (at least twice) its prediction, says the
    # table is stale; both hints name the table this search used (its --tables and --weights)
    said = " ".join(proc.stderr.split())
    assert "the latency table predicts the unpruned model at" in said
    for flag in ("--recalibrate", "--rebuild"):
        hint = re.search(rf"`(autoprune profile [^`]*{flag})`", said)
        assert hint, flag
        assert hint[1].startswith(f"autoprune profile --target-device cpu-ort --tables {stale} "
                                  f"--weights {ckpt} "), hint[1]

    proc = run_cli(*args, "--searcher", "random", "--trials", "12", "--study", "r",
                   "--verify-top", "12", check=True)
    measured = json.loads((runs / "r" / "measured.json").read_text())
    assert measured["tolerance"] == 0.05
    for rec in measured["policies"].values():  # an absolute budget: measured over it
        assert rec["over_budget"] == pytest.approx(rec["median_ms"] / budget_ms, rel=1e-4)
        assert "reference_ms" not in rec
    best = json.loads((runs / "r" / "best_policy.json").read_text())
    key = json.dumps(best["channels"], sort_keys=True)
    assert measured["policies"][key]["median_ms"] == best["measured_ms"]
    assert best["measured_over_budget"] <= 1.05
    cands = [json.loads(x) for x in _lines(runs / "r" / "candidates.jsonl")]
    assert all(c["feasible"] for c in cands)  # by the stale prediction
    above = [c for c in cands if (c["val_acc"], -c["latency_ms"]) >
             (best["val_acc"], -best["latency_ms"])]
    # every candidate more accurate than the best was measured twice (noise only adds time:
    # the lower counts), and measured over the limit
    assert all(measured["policies"][json.dumps(c["policy"], sort_keys=True)]["over_budget"] >
               1.05 for c in above)
    assert all(measured["policies"][json.dumps(c["policy"], sort_keys=True)]["remeasured"]
               for c in above)
    if above:
        assert f"{len(above)} more accurate candidate(s) measured over it" in \
            " ".join(proc.stdout.split())  # rich wraps long lines
    summary = json.loads((runs / "r" / "summary.json").read_text())
    assert summary["best"]["policy"] == best["channels"]
    assert summary["measured"]["best"]["measured_ms"] == best["measured_ms"]
    assert summary["measured"]["unpruned"]["measured_ms"] > 0

    # a budget as a fraction counts from the unpruned model measured beside each policy, or
    # from the quietest such measurement of the check, if that was faster
    frac = float(mid_budget(ckpt, stale))
    i = args.index("--latency-budget-ms")
    run_cli(*args[:i], "--latency-budget", frac, *args[i + 2:], "--searcher", "random",
            "--trials", "4", "--study", "f", check=True)
    records = json.loads((runs / "f" / "measured.json").read_text())["policies"].values()
    for rec in records:
        assert rec["budget_reference_ms"] <= rec["reference_ms"]
        assert rec["over_budget"] == pytest.approx(
            rec["median_ms"] / (frac * rec["budget_reference_ms"]), rel=1e-4)

    # a resume measures nothing again, and the report shows the measured column
    before = (runs / "r" / "measured.json").read_text()
    run_cli(*args, "--searcher", "random", "--trials", "12", "--study", "r", "--verify-top",
            "12", check=True)
    assert json.loads((runs / "r" / "measured.json").read_text()) == json.loads(before)
    report = run_cli("report", "--study", "r", "--runs", runs, check=True).stdout
    assert "measured" in report and f"{best['measured_ms']:.4f} ms" in report
    # `--verify-top 0` trusts the predictor again: the best is the most accurate candidate
    proc = run_cli(*args, "--searcher", "random", "--trials", "12", "--study", "r",
                   "--verify-top", "0", check=True)
    top = max(cands, key=lambda c: (c["val_acc"], -c["latency_ms"]))
    assert json.loads((runs / "r" / "best_policy.json").read_text())["channels"] == \
        top["policy"]
    assert "best not measured on the device" in proc.stdout
    # a corrupt measurements file is named, with the way out; the candidates are untouched
    log_before = (runs / "r" / "candidates.jsonl").read_text()
    (runs / "r" / "measured.json").write_text("{torn")
    assert_user_error(run_cli("report", "--study", "r", "--runs", runs),
                      "measured.json' is corrupt", "delete it")
    assert (runs / "r" / "candidates.jsonl").read_text() == log_before


def test_infeasible_budget_cli(cli_env, tmp_path):
    ckpt, tables, _ = cli_env
    proc = run_cli(*_search_args(ckpt, tables, tmp_path / "runs", "random", 2, "s", "0.05"))
    assert_user_error(proc, "below the smallest achievable")
    assert not (tmp_path / "runs" / "s").exists()
    assert_user_error(run_cli("report", "--study", "nope", "--runs", tmp_path), "no study")


def test_policy_objects_are_keyed_by_name(setup):
    _, space, _, _, _ = setup
    assert all(isinstance(k, str) for k in Policy.from_dict(space.full().to_dict()))


def test_measured_check_rescales_the_predictor_when_the_best_all_miss(tmp_path):
    """When the most accurate candidates all measure over the budget (here the predictions are
    half the real latency, as from a stale table), the check rescales the predictor by what
    it measured and measures the most accurate candidates that should fit after all; then the
    ones it passed over are measured a second time (the lower counts).

    ResNet-20 at Fashion-MNIST's 28x28, not the digits model: at 8x8 its latency is mostly
    per-op overhead, and on a faster CPU the widest policies measured only 1.2x the budget
    policy, close enough to 1.05 for a busy spell to make one of them fit."""
    from autoprune.evaluate import Candidate, budget_measurer, first_measured_fit, policy_key

    model = build_model(ModelSpec("resnet20", num_classes=10, in_channels=1, input_size=28))
    model.eval()  # accuracy plays no part: each candidate's is set to its ratio below
    x = torch.zeros(1, 1, 28, 28)
    space = SearchSpace.from_model(model, x, SpaceSpec.for_family("resnet"), round_to=8)
    device = get_device("cpu-ort")
    ratios = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    by_policy = {}
    for r in ratios:  # wider is more accurate, as pruning goes: set so, so the order is known
        by_policy.setdefault(space.uniform(r), r)
    with get_backend(device) as backend:
        pred = build_table(model, space, device, backend, key=model_key("resnet20", x.shape),
                           model_name="resnet20", path=tmp_path / "cpu-ort" / "r20.json",
                           calibrate_n=3).predictor()
        cands = [Candidate(p, r, pred.predict(p) * 0.5, 1, 1, True, "test", i, 0.0)
                 for i, (p, r) in enumerate(by_policy.items())]  # by the stale prediction
        # the budget: what the policy at 0.4 measures, so the widest ones measure over it
        budget = budget_measurer(backend, model, space, budget_ms=1.0)(
            space.uniform(0.4))["median_ms"]
        measure = budget_measurer(backend, model, space, budget_ms=budget)
        known: dict[str, dict] = {}
        found = first_measured_fit(cands, measure, tolerance=0.05, top=3, known=known)
    order = sorted(cands, key=lambda c: -c.val_acc)
    assert found is not None and known[policy_key(found.policy)]["over_budget"] <= 1.05
    assert all(known[policy_key(c.policy)]["over_budget"] > 1.05 and
               known[policy_key(c.policy)]["remeasured"] for c in order[:3])
    ahead = order[3:order.index(found)]
    # after the three widest, at most 3 more measured, and the rescaled predictor skipped some
    assert sum(policy_key(c.policy) in known for c in ahead) <= 2
    assert any(policy_key(c.policy) not in known for c in ahead)


def test_the_measured_check_watches_the_machine_for_its_slow_state():
    """The measured check at the end of a search (`watched_measurer`). This machine has a slow
    state that costs a pruned ResNet-20 1.4x and the unpruned model 1.14x: one measurement
    there puts a policy at 0.98 x budget at 1.2, and the check passed over the most accurate
    candidate for a less accurate one. Watched, the first policy is measured until the
    measurements span ``seconds`` (a quick moment shows); a later one caught in a slow moment
    (its unpruned reference 5% over the quickest) again until one is quiet, for ``seconds`` at
    most; each counts its quickest quiet measurement, against the quickest reference."""
    import time

    from autoprune.evaluate import Candidate, first_measured_fit, policy_key, watched_measurer

    fraction, quick_ref = 0.5, 0.5

    def device(true, slow):
        """budget_measurer's records: policy ``p`` measures ``true[p]`` x budget on a quiet
        machine (x 1.4, the reference x 1.14, where ``slow(call number, seconds since the
        first call)``); each call takes 2 ms."""
        calls, quietest, t0 = [], [float("inf")], []

        def measure(p):
            t0[:] = t0 or [time.perf_counter()]
            time.sleep(0.002)
            calls.append(p)
            k = 1.4 if slow(len(calls), time.perf_counter() - t0[0]) else 1.0
            ref = quick_ref * (1.14 if k > 1 else 1.0)
            ms = true[p] * fraction * quick_ref * k
            quietest[0] = min(quietest[0], ref)
            return {"median_ms": ms, "reference_ms": ref, "budget_reference_ms": quietest[0],
                    "over_budget": ms / (fraction * quietest[0])}

        return measure, calls

    a, b = Policy.from_dict({"g": 16}), Policy.from_dict({"g": 8})  # a: the more accurate
    true = {a: 0.98, b: 0.75}
    cands = [Candidate(a, 0.9, 1.0, 1, 1, True, "t", 0, 0.0),
             Candidate(b, 0.8, 0.8, 1, 1, True, "t", 1, 0.0)]
    spell = lambda n, t: t < 0.1  # noqa: E731 - slow for the check's first 0.1 s

    # one measurement each (the check as it was): a at 1.2, b fits, a again still slow
    measure, calls = device(true, spell)
    known: dict = {}
    got = first_measured_fit(cands, watched_measurer(measure, seconds=0), tolerance=0.05, top=2,
                             known=known)
    assert got.policy == b and len(calls) == 3
    assert known[policy_key(a)]["over_budget"] == pytest.approx(0.98 * 1.4 / 1.14)
    # watched for 0.2 s: a measured through the spell, and its quiet measurement fits
    measure, calls = device(true, spell)
    known = {}
    got = first_measured_fit(cands, watched_measurer(measure, seconds=0.2), tolerance=0.05,
                             top=2, known=known)
    rec = known[policy_key(a)]
    assert got.policy == a and rec["quiet"] and rec["measurements"] == len(calls) > 20
    assert rec["over_budget"] == pytest.approx(0.98) and rec["budget_reference_ms"] == quick_ref

    # a later policy caught in a slow moment is measured until a quiet one; one slow to the end
    # stops at ``seconds`` and says so
    measure, calls = device(true, lambda n, t: 0.15 < t < 0.25)
    seen = []
    watch = watched_measurer(measure, seconds=0.1, on_measured=lambda p, r: seen.append(p))
    t0 = time.perf_counter()
    assert watch(a)["measurements"] > 1
    time.sleep(max(0.0, t0 + 0.16 - time.perf_counter()))
    later = watch(b)  # ~0.09 s of slow measurements, then a quiet one
    assert later["over_budget"] == pytest.approx(0.75) and later["quiet"]
    assert later["measurements"] > 10
    measure, calls = device(true, lambda n, t: n > 1)
    watch = watched_measurer(measure, seconds=0.05)
    assert watch(a)["quiet"] and not (stuck := watch(b))["quiet"]
    assert stuck["over_budget"] == pytest.approx(0.75 * 1.4)  # against the quick reference
    assert stuck["measurements"] > 0.05 / 0.002 / 2  # for ``seconds``
    assert seen == [a, b]

    # a budget in ms has no reference: the first policy's quickest over ``seconds``
    def in_ms(p, t0=[]):  # noqa: B006 - the first call's time
        t0[:] = t0 or [time.perf_counter()]
        time.sleep(0.002)
        slow = time.perf_counter() - t0[0] < 0.05
        return {"median_ms": 1.4 if slow else 1.0, "over_budget": 1.4 if slow else 1.0}

    rec = watched_measurer(in_ms, seconds=0.1)(a)
    assert rec["over_budget"] == 1.0 and rec["quiet"] and "budget_reference_ms" not in rec


def test_workers_sharing_a_study_merge_their_measurements(setup, tmp_path):
    """Two workers of one study (`--storage`) each measure policies at their end; neither
    write loses what the other measured."""
    from autoprune.evaluate import budget_measurer
    from autoprune.study import Study

    model, space, pred, budget, _ = setup
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    a, b = (Study(tmp_path / "s", {}, storage_url=url) for _ in range(2))
    (tmp_path / "s").mkdir()
    wide, narrow = space.full(), space.smallest()
    with get_backend(get_device("cpu-ort")) as backend:
        measure = budget_measurer(backend, model, space, budget_ms=budget)
        assert a.measured == b.measured  # both loaded before either writes: the race
        a.measurement(wide, measure)
        b.measurement(narrow, measure)
    on_disk = json.loads((tmp_path / "s" / "measured.json").read_text())["policies"]
    assert set(on_disk) == {json.dumps(p.to_dict(), sort_keys=True) for p in (wide, narrow)}
    assert b.measurement(wide) == a.measurement(wide)  # b took a's measurement in
    assert all(r["median_ms"] > 0 and r["over_budget"] == pytest.approx(r["median_ms"] / budget)
               for r in on_disk.values())


def _cand(channels, acc, trial, searcher="evolution"):
    return Candidate(Policy.from_dict(channels), acc, 1.0, 10, 10, True, searcher, trial, 0.1)


def test_workers_sharing_a_study_folder_read_each_others_candidates(tmp_path):
    """Workers of one study (`--storage`) append to one candidates.jsonl. Each reads what the
    others logged (`Study.refresh`: the search serves those policies from its cache, and the
    results judge all of them), never its own lines twice; a line torn by a killed worker is
    ended, not cut, since the others may be appending after it, and skipped on load."""
    from autoprune.study import Study

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    a, b = (Study.open(tmp_path / "s", {"searcher": "evolution"}, storage_url=url)
            for _ in range(2))
    c1, c2, c3 = (_cand({"g": 8 * i}, 0.5 + i / 10, i) for i in (1, 2, 3))
    a.append(c1)
    assert b.refresh() == [c1] and b.refresh() == []
    b.append(c2)
    assert a.refresh() == [c2]  # not its own c1 again
    assert a.candidates == b.candidates == [c1, c2]
    assert a.best() == b.best() == c2
    log = tmp_path / "s" / "candidates.jsonl"
    with open(log, "ab") as f:
        f.write(c3.to_json().encode()[:25])  # a worker killed mid-write
    late = Study.open(tmp_path / "s", {"searcher": "evolution"}, storage_url=url)
    assert late.candidates == [c1, c2]
    assert log.read_bytes().endswith(c3.to_json().encode()[:25] + b"\n")  # ended, not cut
    a.append(c3)
    assert b.refresh() == late.refresh() == [c3]
    assert Study.load(tmp_path / "s").candidates == [c1, c2, c3]  # the torn line skipped
    assert a.candidates == b.candidates == late.candidates == [c1, c2, c3]


def test_a_torn_last_line_of_a_study_of_one_process_is_dropped(tmp_path):
    from autoprune.study import Study

    c1, c2 = _cand({"g": 8}, 0.5, 0), _cand({"g": 16}, 0.6, 1)
    s = Study.open(tmp_path / "s", {"searcher": "random"})
    s.append(c1)
    s.append(c2)
    s.release()
    log = tmp_path / "s" / "candidates.jsonl"
    whole = log.read_bytes()
    log.write_bytes(whole + b'{"policy": {"g"')
    again = Study.open(tmp_path / "s", {"searcher": "random"})
    assert again.candidates == [c1, c2] and log.read_bytes() == whole
    assert again.refresh() == []  # nothing to catch up on without other workers
