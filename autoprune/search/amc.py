"""AMC (He et al., ECCV 2018): a DDPG agent walks the groups in order and picks each one's keep
ratio; the budget is enforced while the episode is built (the action wall), so every finished
episode is feasible.

Deviations from the paper, each for a reason:
- Actions choose *channels kept* on the group's grid (AMC: a continuous ratio then rounded), so
  policies are exactly what the device's latency table measured.
- Every transition is stored as terminal with the episode's final reward minus the moving
  baseline. With AMC's gamma = 1 and one shared final reward the bootstrapped target only adds
  noise from the critic; the terminal target is the quantity AMC's reward shaping aims at.
- So the update has no target networks (AMC's tau = 0.01 has nothing to act on): with every
  transition terminal, SB3's target networks never entered a loss, and their Polyak updates
  took about a quarter of each update's time.
- The budget is latency predicted on the target device (AMC: FLOPs or latency from a table),
  and the wall uses the predictor's cheapest completion of the partial policy.
- Policies already in the study's log are served from the cache: a resumed agent replays the
  episodes after its last checkpoint without evaluating them again.
- The exploration noise decays 0.95 per episode as in AMC but stops at ``sigma_min`` = 0.1 of
  the action range (AMC lets it fall to ~0). On a channel grid a smaller noise almost never
  moves a width by one step (the finest ResNet-20 group on the 8-channel grid has a step of
  1/6), so with AMC's schedule the agent became deterministic after ~85 episodes and spent the
  rest of a 300-episode budget replaying cached policies: 70 to 87 distinct candidates
  evaluated, measured in ``bench/search_quality.py``.
- The noise decays only after an episode that found a policy no earlier episode had; an
  episode that repeats one *raises* it by ``sigma_growth`` (up to AMC's initial 0.5). At a tight
  budget the wall clips a saturated actor to the same policy whatever the noise below the
  wall does, and the floor alone left two of three agents with fewer than 30 distinct
  policies in 1,500 episodes at budget 0.3. With growth 0.95^-4 the noise settles where about
  four episodes in five are new.
- The actor's loss adds ``actor_reg`` (default 1) times the mean square of how far its pre-tanh
  activation goes beyond +-2 (a soft bound on the action's mean, as in PPO implementations'
  bound loss). AMC has none. At budget 0.5, seed 0's actor saturated at +1 in every group
  within 15 episodes of training, where tanh passes almost no gradient. It stayed there for the
  remaining ~580 episodes, the noise explored only below it, and the best of 300 candidates
  was 32.15%. Inside +-2 nothing changes; beyond it, the penalty holds the activation where the
  actor can still move back. A plain square penalty pulled every action toward its fair share
  (near the uniform policy) and lost 17 points on seed 1. Measured in
  ``bench/search_quality.py`` (3 seeds, 300 candidates): best val acc at budget 0.5 51.6%
  (46.35, 54.3, 54.2) against 45.3% (32.15, 53.0, 50.65) without it; at 0.3 19.8%
  (19.4, 20.3, 19.75) against 20.1%, after the measured check.
- An action is, by default, the latency the group may spend: 0 to 2 times its fair share of
  the slack the budget still leaves (``action="share"``, see `PruningEnv`), still clipped by
  the wall. AMC's action (a keep ratio over the group's bounds, ``"bounds"``) hands the whole
  slack to the first groups that ask under a tight budget, so at budget 0.3 its agents built
  the same few policies. Measured in ``bench/search_quality.py`` (3 seeds, 300 candidates):
  best val acc 20.85% (share) against 17.0% (bounds) at budget 0.3, 45.3% against 44.2% at
  0.5. With shares no group can spend more than twice its fair share, so at budget 0.5 the
  stage-3 residual stream of ResNet-20 (the winners of random keep it whole) reaches its full
  width only where earlier groups spend little; ``"reach"`` carries the action on from the fair
  share (0.5) to the whole slack (1). It measured no better (47.65% against 48.4% at 0.5, 3
  seeds, every winner with that stream whole in both), so it is an option, not the default.
- The run length is counted in evaluated candidates, not episodes (AMC: a fixed number of
  episodes): an episode that repeats an earlier policy is served from the cache, so 300
  episodes evaluated only 125 to 213 candidates, and amc was compared with searchers that
  evaluated 300. It now runs until ``--trials`` distinct candidates, at most 5x as many
  episodes.
- An episode that builds a policy an earlier episode evaluated evaluates instead a feasible
  neighbour that none did (one grid step or a few from it, or where all of those were, a
  random draw projected onto the budget: `BudgetWall.unseen_near`, as evolution and random
  do), and the agent stores that policy's transitions: at each step the observation and the
  action with which the env picks the neighbour's width
  (`PruningEnv.trace`). DDPG learns off-policy, so these teach it as its own would. The
  exploration noise still grows on the agent's own repeats (``repeats="move"``, the default;
  ``"replay"`` serves the repeat from the cache, as studies made before did). A repeat had
  cost an episode and an update but no evaluation: at budget 0.3 amc ran 757 to 1,095
  episodes for its 300 candidates, and its updates were 16% of the wall time; with moves it
  runs one episode per candidate. Measured in ``bench/search_quality.py``.
- The first episodes evaluate evolution's seeds (`seed_policies`: the uniform policy at the
  budget, then for each group that policy with the group kept whole and the others shrunk to
  pay for it) in place of the policies they build, and the agent stores their traces as it
  does a move's (``warmup_policies="seeds"``, the default; ``"random"``: AMC's random warm-up
  alone, as studies made before). AMC's agent starts from nothing, and at budget 0.3 the
  winners of 300 candidates were level with random search's (19.0% against 18.98%, 3 seeds,
  on a family-25 CPU) while evolution, bred from these seeds, reached 23.4%: the most
  accurate policies there keep one costly group (the stage-3 residual stream) whole, a
  corner that neither random actions nor the actor's fair shares reach. With the seeds amc's
  winners reached 22.85% (23.05, 22.7, 22.8). Each of those three winners *is* the seed with
  that stream whole: there the agent did not improve on its seed in 300 episodes. At budget
  0.5 none of the three winners is a seed, and they reached 49.33% (47.85, 48.45, 51.7),
  where amc without seeds (and with AMC's 12 gradient steps) had reached 46.57% on the same
  CPU the session before. Measured in ``bench/search_quality.py``.
- After each episode the agent takes half as many gradient steps as the episode stored
  transitions (``update_ratio`` 0.5; AMC: one per transition, ``1``). The update was most of
  amc's own time: at budget 0.3, where an evaluation takes 0.45 s on a family-25 CPU, AMC's
  12 steps (20 ms an episode) put amc's overhead at 5.6% of the wall time (5.94, 5.3, 5.5%
  over 3 seeds of 300 candidates; the target is 5%). With 6 steps it was 3.6%, and the
  winners were the same policies, with seeds: 22.85% (23.05, 22.7, 22.8) both ways. Without
  seeds, half the steps had scored 18.82% against 19.0% with AMC's, within the spread of
  seeds. Measured in ``bench/search_quality.py``.
- The replay buffer holds AMC's 100 episodes (``rmsize`` 100 per layer in AMC's code; it held
  100,000 transitions before), which also keeps each checkpoint small.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import pickle
import shutil
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from ..errors import UserError
from ..policy import Policy
from .base import BudgetWall, SearchContext, Searcher

log = logging.getLogger(__name__)

N_FEATURES = 10
# "share" (default): the action scales the group's fair share of the latency the budget still
# leaves (see PruningEnv); "bounds": the action spans the group's bounds and the wall clips it
# (AMC); "wall": the action spans the group's minimum to the most the wall allows; "reach":
# as "share" up to 0.5 (the fair share), then on from the fair share to the whole slack
ACTIONS = ("bounds", "wall", "share", "reach")
# an episode that builds a policy an earlier one evaluated: "move" evaluates a feasible
# neighbour not yet evaluated and learns from that; "replay" serves it from the cache (AMC)
REPEATS = ("move", "replay")
# the first episodes: "seeds" evaluate evolution's seeds in place of the policies they build
# (the agent learns from those), "random" are the agent's random warm-up alone (AMC)
WARMUP_POLICIES = ("seeds", "random")
KIND_CODE = {"conv": 0.0, "depthwise": 0.5, "linear": 1.0}
# the actor's pre-tanh activation is penalised beyond +-ACTOR_BOUND (tanh 0.964, where tanh
# still passes 7% of the gradient), with weight ACTOR_REG (see the module's docstring)
ACTOR_BOUND, ACTOR_REG = 2.0, 1.0
# gradient steps after each episode, per group (AMC: 1, one per stored transition; see the
# module's docstring)
UPDATE_RATIO = 0.5
# the agent's update runs on the thread count whose last UPDATE_TRIALS timed updates were the
# quicker; every RECHECK_EVERY-th update runs on the other one, to see whether that changed
UPDATE_TRIALS, RECHECK_EVERY = 4, 10


def _group_features(space, predictor) -> np.ndarray:
    """Static per-group features (index, type, in/out channels, stride, kernel, latency share),
    min-max normalised over the groups."""
    ops = {op.name: op for op in predictor.ops}
    costs = predictor.group_costs(space.full())
    total = sum(costs.values())
    rows = []
    for i, g in enumerate(space.groups):
        op = ops.get(g.name)
        rows.append([i, KIND_CODE.get(g.kind, 0.0), op.cin if op else g.channels, g.channels,
                     op.stride if op else 1, op.kernel if op else 1,
                     costs.get(g.name, 0.0) / total])
    a = np.asarray(rows, dtype=np.float64)
    lo, hi = a.min(axis=0), a.max(axis=0)
    return ((a - lo) / np.where(hi > lo, hi - lo, 1.0)).astype(np.float32)


class PruningEnv(gym.Env):
    """Gymnasium env: one step per group; the action (in [0, 1]) picks the group's width
    between its bounds, clipped by the action wall (``action="bounds"``, AMC), or between its
    minimum and the most the wall allows (``"wall"``), or (``"share"``) as the latency it may
    spend: ``2 * action`` times its fair share of the slack, the budget minus the policy so far
    with every later group at its minimum, shared in proportion to what each remaining group
    can add (its latency from minimum to full width), snapped to the nearest width and
    clipped by the wall. Under a tight budget the first two give the slack to the first
    groups that ask, so a random or saturated actor always builds the same few policies;
    with shares, action 0.5 everywhere spreads the slack over every group.
    Reward only at the end of an episode: val accuracy (``reward="acc"``) or
    ``-error * log(latency)`` (``"acc-log-latency"``)."""

    def __init__(self, space, predictor, budget_ms: float, evaluate, *, reward: str = "acc",
                 action: str = "share", known=None, seed: int = 0, first=()):
        super().__init__()
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        self.space, self.predictor, self.budget_ms = space, predictor, budget_ms
        self.evaluate, self.reward_kind, self.action = evaluate, reward, action
        # ``known(policy)``: whether the study evaluated it already. Given, an episode whose
        # policy an earlier episode had evaluates a feasible neighbour not yet evaluated
        # instead (see `_moved`); None: it is served from the cache (AMC)
        self.known, self.seed = known, seed
        # episode i < len(first) evaluates first[i] in place of the policy it built, unless
        # an earlier episode evaluated that one (then the episode goes on as any other)
        self.first = list(first)
        self.wall = BudgetWall(space, predictor, budget_ms)
        self.static = _group_features(space, predictor)
        costs = predictor.group_costs(space.full())
        self.full_ms = predictor.max_latency()
        self.shares = np.array([costs.get(g.name, 0.0) for g in space.groups]) / self.full_ms
        # latency each group can add: minimum to full width, every other group at its minimum
        self._smallest = space.smallest().to_dict()
        floor = predictor.predict(self._smallest)
        self.spans = np.array([predictor.predict({**self._smallest, g.name: g.max_channels})
                               - floor for g in space.groups])
        self.observation_space = spaces.Box(0.0, 1.0, (N_FEATURES,), np.float32)
        self.action_space = spaces.Box(0.0, 1.0, (1,), np.float32)
        self.episode = 0
        self._reset_state()

    def _reset_state(self):
        self.t, self.partial, self.prev_action = 0, {}, 0.0

    def _obs(self) -> np.ndarray:
        """Static features of the current group + latency reduced so far (fraction of the
        unpruned latency), latency share of the groups still to come, previous action."""
        current = self.predictor.predict({**self.space.full().to_dict(), **self.partial})
        reduced = (self.full_ms - current) / self.full_ms
        rest = float(self.shares[self.t + 1:].sum())
        return np.clip(np.concatenate([self.static[self.t], [reduced, rest, self.prev_action]]),
                       0.0, 1.0).astype(np.float32)

    def _share_keep(self, g, a: float) -> int:
        """The width whose added latency is nearest ``2a`` x the group's fair share of the
        slack (see the class docstring). Where that width breaks the wall, the widest
        narrower one that does not: with the later groups at their minimum these are the
        wall's own predictions, so no other check is needed (and where costs are monotone
        this is the wall's widest width, as AMC clips)."""
        costs, floor, slack, fair = self._share_terms(g)
        if self.action == "reach" and a > 0.5:  # past the fair share, on to the whole slack
            spend = fair + (2.0 * a - 1.0) * (slack - fair)
        else:
            spend = min(slack, 2.0 * a * fair)
        keep = min(g.choices, key=lambda c: (abs(costs[c] - floor - spend), c))
        return self.wall.clip(self.partial, g.name, keep, costs)

    def _share_terms(self, g) -> tuple[dict[int, float], float, float, float]:
        """For group ``g`` at the current step: the predicted latency of the policy so far with
        each width of ``g`` and the later groups at their minimum, the floor (``g`` at its
        minimum too), the slack the budget leaves above it, and ``g``'s fair share of that
        slack (in proportion to what it can add, of what the groups left can add)."""
        base = {**self._smallest, **self.partial}  # this group and the later at their minimum
        costs = self.predictor.sweep(base, g.name)
        floor = costs[g.choices[0]]  # = the prediction of ``base`` itself
        slack = max(0.0, self.budget_ms - floor)
        rest = float(self.spans[self.t:].sum())
        fair = slack * float(self.spans[self.t]) / rest if rest > 0 else slack
        return costs, floor, slack, fair

    def _seen_before(self, policy: Policy) -> bool:
        """Whether an earlier episode evaluated ``policy``. Asked of the study's log by the
        candidate's trial (= its episode), so a resumed agent replaying the episodes after its
        checkpoint sees what the original run saw, not the policies those episodes logged."""
        if self.known is not None and not self.known(policy):
            return False
        # (without ``known``, asking is an evaluation: of a seed, which the episode would
        # evaluate anyway)
        return self.evaluate(policy, self.episode).trial < self.episode  # served from the log

    def _moved(self, policy: Policy) -> Policy:
        """For an episode that repeats an earlier policy: a feasible policy one or a few grid
        steps from it that no earlier episode evaluated, else a random one on the budget
        (`BudgetWall.unseen_near`, as evolution and random do), or the policy itself where
        none is found. Drawn with an RNG of (seed, episode), so a replayed episode moves where
        the original one did."""
        rng = np.random.default_rng([self.seed, self.episode])
        return self.wall.unseen_near(policy, self._seen_before, rng)

    def action_for(self, g, width: int) -> float:
        """The action (in [0, 1]) with which `step` picks ``width`` for group ``g`` from the
        current state: the inverse of its mapping, clipped to [0, 1] where no action reaches
        the width exactly (then the action nearest it)."""
        lo = g.min_channels
        if self.action in ("share", "reach"):
            costs, floor, slack, fair = self._share_terms(g)
            spend = costs[width] - floor
            if self.action == "reach" and spend > fair:
                a = 0.5 + (spend - fair) / (2.0 * (slack - fair)) if slack > fair else 1.0
            else:
                a = spend / (2.0 * fair) if fair > 0 else 0.0
        else:
            top = self.wall.max_keep(self.partial, g.name) if self.action == "wall" \
                else g.max_channels
            a = (width - lo) / (top - lo) if top > lo else 0.0
        return float(np.clip(a, 0.0, 1.0))

    def trace(self, policy: Policy) -> list[tuple[np.ndarray, float]]:
        """The (observation, action) of each step of an episode that builds ``policy``: the
        transitions an agent stores for a policy it did not build itself (a moved repeat).
        DDPG learns off-policy, so these are as good as its own. Leaves the env as it was."""
        saved = (self.t, dict(self.partial), self.prev_action)
        self._reset_state()
        out = []
        widths = policy.to_dict()
        for g in self.space.groups:
            obs = self._obs()
            a = self.action_for(g, widths[g.name])
            out.append((obs, a))
            self.partial[g.name] = widths[g.name]
            self.prev_action = a
            self.t += 1
        self.t, self.partial, self.prev_action = saved
        return out

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._reset_state()
        return self._obs(), {}

    def step(self, action):
        a = float(np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[0], 0.0, 1.0))
        g = self.space.groups[self.t]
        if self.action in ("share", "reach"):  # already within the wall
            keep = self._share_keep(g, a)
        else:
            most = self.wall.max_keep(self.partial, g.name)
            top = most if self.action == "wall" else g.max_channels
            wanted = g.min_channels + a * (top - g.min_channels)
            keep = min(g.choices, key=lambda c: (abs(c - wanted), -c))
            # the wall's own width fits; a narrower one may not where costs are not monotone
            keep = most if keep >= most else self.wall.clip(self.partial, g.name, keep)
        self.partial[g.name] = keep
        self.prev_action = a
        self.t += 1
        done = self.t == len(self.space)
        reward, info = 0.0, {}
        if done:
            policy = Policy.from_dict(self.partial)
            repeat = self._seen_before(policy) if self.known is not None else None
            seed = self.first[self.episode] if self.episode < len(self.first) else None
            if seed is not None and not self._seen_before(seed):
                evaluated = seed  # (see `AMCSearcher.first_policies`)
            else:
                evaluated = self._moved(policy) if repeat else policy
            cand = self.evaluate(evaluated, self.episode)
            # "new": first evaluated in this episode (not a policy an earlier episode had);
            # "repeat": the agent's own policy was one an earlier episode had
            new = cand.trial == self.episode
            info = {"candidate": cand, "new": new, "repeat": not new if repeat is None else repeat}
            if evaluated != policy:  # what the agent learns from: the policy evaluated
                info["trace"] = self.trace(evaluated)
                info["seeded"] = evaluated is seed
            self.episode += 1
            if self.reward_kind == "acc":
                reward = cand.val_acc
            else:
                reward = -(1.0 - cand.val_acc) * math.log(cand.latency_ms)
        obs = np.zeros(N_FEATURES, np.float32) if done else self._obs()
        return obs, float(reward), done, False, info


class _HandGrad:
    """A stable-baselines3 MLP (Linear layers with ReLU between, maybe a final Tanh, left to the
    caller) with its backward pass written out: gradients go into fixed buffers, which are also
    the parameters' ``.grad``. On these small nets (300x300, batch 64) autograd's bookkeeping
    and the optimiser's per-call work were a third of the update's time."""

    def __init__(self, seq) -> None:
        import torch

        self.linears = [m for m in seq if isinstance(m, torch.nn.Linear)]
        self.params = [p for lin in self.linears for p in (lin.weight, lin.bias)]
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.grads = [p.grad for p in self.params]

    def forward(self, x) -> tuple[list, list]:
        """Each layer's input and output before its activation; the last is the net's output
        before any final Tanh."""
        import torch

        ins, pres = [], []
        last = len(self.linears) - 1
        for i, lin in enumerate(self.linears):
            ins.append(x)
            z = torch.addmm(lin.bias, x, lin.weight.t())
            pres.append(z)
            x = torch.relu(z) if i < last else z
        return ins, pres

    def backward(self, ins, pres, d_out, weight_grads: bool = True, input_grad: bool = False):
        """Back from ``d_out`` (the gradient at the last output): fills ``grads`` when
        ``weight_grads``, and returns the gradient at the input when ``input_grad``."""
        import torch

        g = d_out
        for i in range(len(self.linears) - 1, -1, -1):
            if weight_grads:
                torch.mm(g.t(), ins[i], out=self.grads[2 * i])
                torch.sum(g, 0, out=self.grads[2 * i + 1])
            if i == 0:
                return torch.mm(g, self.linears[0].weight) if input_grad else None
            g = torch.mm(g, self.linears[i].weight)
            g = torch.ops.aten.threshold_backward(g, pres[i - 1], 0)  # through the ReLU
        return None


class FusedAdam:
    """``torch.optim.Adam(fused=True)`` for the agent's two small networks, without
    ``torch.optim.Optimizer``: creating one of those imports ``torch._dynamo`` (about 1 s here,
    once per process, through the ``_disable_dynamo`` wrappers on its methods), and each
    ``step`` passes the same wrappers and checks (about 0.1 ms a call, two calls a gradient
    step). The update itself is torch's: ``torch._fused_adam_`` on the same state tensors, so
    the parameters move exactly as torch's Adam moves them (checked in the tests). Param groups,
    state and ``state_dict`` have torch's layout, so a checkpoint of either loads into the
    other; one param group, no weight decay, no amsgrad (what SB3 asks of it)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, maximize: bool = False,
                 fused: bool = True):
        if weight_decay or amsgrad or not fused:
            raise ValueError("FusedAdam is fused Adam without weight decay or amsgrad")
        params = list(params)
        self.defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": 0,
                         "amsgrad": False, "maximize": maximize, "foreach": None,
                         "capturable": False, "differentiable": False, "fused": True,
                         "decoupled_weight_decay": False}
        self.param_groups = [{"params": params, **self.defaults}]
        self.state = {p: self._fresh(p) for p in params}

    @staticmethod
    def _fresh(p) -> dict:
        import torch

        # torch's Adam creates the same state at its first step (a float32 step for fused)
        return {"step": torch.zeros((), dtype=torch.float32), "exp_avg": torch.zeros_like(p),
                "exp_avg_sq": torch.zeros_like(p)}

    def step_on(self, params, grads) -> None:
        """One Adam step of ``params`` along ``grads`` (tensors of the same shapes)."""
        import torch

        if not params:
            return
        group = self.param_groups[0]
        states = [self.state[p] for p in params]
        steps = [s["step"] for s in states]
        beta1, beta2 = group["betas"]
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(list(params), list(grads), [s["exp_avg"] for s in states],
                           [s["exp_avg_sq"] for s in states], [], steps, amsgrad=False,
                           lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=0.0,
                           eps=group["eps"], maximize=group["maximize"], grad_scale=None,
                           found_inf=None)

    def step(self) -> None:
        """``Optimizer.step()``: a step along each parameter's ``.grad``."""
        with_grad = [p for p in self.param_groups[0]["params"] if p.grad is not None]
        self.step_on(with_grad, [p.grad for p in with_grad])

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.param_groups[0]["params"]:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self) -> dict:
        params = self.param_groups[0]["params"]
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return {"state": {i: dict(self.state[p]) for i, p in enumerate(params)},
                "param_groups": [{**group, "params": list(range(len(params)))}]}

    def load_state_dict(self, state_dict: dict, strict: bool = True) -> None:
        """Also a ``torch.optim.Adam``'s (``strict`` is SB3's argument for modules)."""
        params = self.param_groups[0]["params"]
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(params):
            raise ValueError("the optimiser state does not match this network's parameters")
        self.param_groups[0].update({k: v for k, v in groups[0].items() if k != "params"})
        self.param_groups[0]["betas"] = tuple(self.param_groups[0]["betas"])
        for i, p in zip(groups[0]["params"], params, strict=True):
            saved = state_dict["state"].get(i)
            self.state[p] = self._fresh(p) if not saved else {
                "step": saved["step"].detach().to(dtype=self.state[p]["step"].dtype),
                "exp_avg": saved["exp_avg"].detach().to(p),
                "exp_avg_sq": saved["exp_avg_sq"].detach().to(p)}


def _adam_step(opt, net: _HandGrad) -> None:
    """``opt.step()`` for the grads in ``net``'s buffers. Agents made before `FusedAdam` (and
    resumed from their checkpoints) have torch's Adam: it steps through ``.grad``."""
    if isinstance(opt, FusedAdam):
        opt.step_on(net.params, net.grads)
        return
    for p, g in zip(net.params, net.grads, strict=True):
        p.grad = g  # (autograd's zero_grad may have dropped them)
    opt.step()


def policy_kwargs() -> dict:
    """The agent's networks (AMC: 300x300 actor and critic) and their optimiser."""
    return {"net_arch": {"pi": [300, 300], "qf": [300, 300]}, "optimizer_class": FusedAdam}


@functools.cache
def make_agent_class():
    """The DDPG subclass, built on first use so stable-baselines3 is imported lazily."""
    import torch
    from scipy.special import ndtr, ndtri
    from stable_baselines3 import DDPG

    class AMCDDPG(DDPG):
        """DDPG with AMC's exploration, reward handling and learning rates."""

        def __init__(self, *args, critic_lr: float = 1e-3, sigma: float = 0.5,
                     sigma_decay: float = 0.95, sigma_min: float = 0.1,
                     sigma_growth: float = 0.95 ** -4, warmup_episodes: int = 10,
                     baseline_alpha: float = 0.5, actor_reg: float = 0.0, **kwargs):
            self.critic_lr, self.actor_reg = critic_lr, actor_reg
            super().__init__(*args, **kwargs)
            # sigma is given in the [0, 1] action range; SB3 acts in the scaled [-1, 1] range
            self.sigma_scaled, self.sigma_min_scaled = 2.0 * sigma, 2.0 * sigma_min
            self.sigma_max_scaled, self.sigma_growth = 2.0 * sigma, sigma_growth
            self.sigma_decay, self.warmup_episodes = sigma_decay, warmup_episodes
            self.baseline_alpha = baseline_alpha
            self.baseline: float | None = None
            self.rng = np.random.default_rng(kwargs.get("seed") or 0)
            self._init_hooks()
            self.episodes_done = 0
            self.candidates_new = 0  # episodes whose policy no earlier episode had
            self.episodes_moved = 0  # episodes that repeated a policy and evaluated another
            self.episodes_seeded = 0  # episodes that evaluated a seed in place of their policy

        def _init_hooks(self) -> None:
            self._episode: list[tuple] = []
            self.update_threads = 1  # the most torch threads `train` uses (`--threads`)
            # None: `train` picks its threads by timing (`_update_threads_now`); set: fixed
            self.update_threads_fixed: int | None = None
            self._update_secs: dict[int, list[float]] = {}  # seconds a gradient step, by threads
            self.update_counts: dict[int, int] = {}  # updates run, by threads (this process)
            self.update_s = 0.0  # seconds spent in `train` (this process)
            self.on_episode = lambda info: None  # progress: called with the episode's info
            self.on_checkpoint = lambda: None  # called where a checkpoint is consistent
            self.should_stop = lambda: False  # checked before every episode

        def collect_rollouts(self, env, callback, train_freq, replay_buffer, *args, **kwargs):
            from stable_baselines3.common.type_aliases import RolloutReturn

            if self.should_stop():
                return RolloutReturn(0, 0, continue_training=False)
            return super().collect_rollouts(env, callback, train_freq, replay_buffer, *args,
                                            **kwargs)

        def _setup_model(self) -> None:
            super()._setup_model()
            # AMC: actor lr 1e-4, critic lr 1e-3 (SB3 uses one rate for both).
            for group in self.critic.optimizer.param_groups:
                group["lr"] = self.critic_lr

        def _update_learning_rate(self, optimizers) -> None:
            optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
            actor_lr = self.lr_schedule(self._current_progress_remaining)
            self.logger.record("train/learning_rate", actor_lr)
            for opt in optimizers:
                lr = self.critic_lr if opt is self.critic.optimizer else actor_lr
                for group in opt.param_groups:
                    group["lr"] = lr

        def _sample_action(self, learning_starts, action_noise=None, n_envs: int = 1):
            if self.episodes_done < self.warmup_episodes:
                scaled = self.rng.uniform(-1.0, 1.0, size=(n_envs, 1))  # random warm-up
            else:
                # the actor's action, already in the scaled range (SB3's `predict` unscales
                # it, and scipy's `truncnorm.rvs` costs ~0.2 ms a call: both per step)
                # (through `_HandGrad`'s forward: the same products as the actor module's,
                # without its module calls, ~0.1 ms a step)
                with torch.no_grad():
                    obs = torch.as_tensor(np.asarray(self._last_obs, dtype=np.float32))
                    mu = torch.tanh(self._hand_grads()[0].forward(obs)[1][-1])
                    mu = mu.numpy().astype(np.float64)
                s = self.sigma_scaled
                # truncated normal around it, inside [-1, 1], by inverting the normal CDF
                lo, hi = ndtr((-1.0 - mu) / s), ndtr((1.0 - mu) / s)
                scaled = (mu + s * ndtri(self.rng.uniform(lo, hi))).reshape(n_envs, 1)
            scaled = np.clip(scaled, -1.0, 1.0).astype(np.float32)
            return self.policy.unscale_action(scaled), scaled

        def _store_transition(self, replay_buffer, buffer_action, new_obs, reward, dones,
                              infos) -> None:
            self._episode.append((np.array(self._last_obs, copy=True),
                                  np.array(buffer_action, copy=True)))
            self._last_obs = new_obs
            if not dones[0]:
                return
            final = float(reward[0])
            self.baseline = final if self.baseline is None else \
                self.baseline + self.baseline_alpha * (final - self.baseline)
            advantage = np.array([final - self.baseline], dtype=np.float32)
            terminal = infos[0].get("terminal_observation")
            if infos[0].get("trace") is not None:  # the env evaluated another policy (a move)
                self._episode = [(obs[None], np.array([[2.0 * a - 1.0]], dtype=np.float32))
                                 for obs, a in infos[0]["trace"]]
                if infos[0].get("seeded"):
                    self.episodes_seeded = getattr(self, "episodes_seeded", 0) + 1
                else:
                    self.episodes_moved = getattr(self, "episodes_moved", 0) + 1
            for i, (obs, act) in enumerate(self._episode):
                nxt = self._episode[i + 1][0] if i + 1 < len(self._episode) else \
                    np.asarray(terminal if terminal is not None else obs)[None]
                replay_buffer.add(obs, nxt, act, advantage, np.array([True]), [{}])
            self._episode = []
            self.episodes_done += 1
            new = bool(infos[0].get("new"))
            self.candidates_new += new
            # the noise follows the agent's own policy: a repeat moved to a new neighbour is
            # still a repeat (envs without moves say only whether the episode was new)
            repeat = bool(infos[0].get("repeat", not new))
            if self.episodes_done > self.warmup_episodes:
                if not repeat:
                    self.sigma_scaled = max(self.sigma_scaled * self.sigma_decay,
                                            self.sigma_min_scaled)
                else:  # a repeat: the agent is stuck on policies it has tried
                    self.sigma_scaled = min(self.sigma_scaled * self.sigma_growth,
                                            self.sigma_max_scaled)
            self.on_episode(infos[0])
            if self.num_timesteps <= self.learning_starts:
                self.on_checkpoint()  # no training follows this rollout: consistent now

        def train(self, gradient_steps: int, batch_size: int = 100) -> None:
            """SB3's DDPG update without its target networks: every stored transition is
            terminal, so the critic's target is the reward itself and the target networks
            (and their Polyak updates, about a quarter of an update's time) never enter a loss.
            The update is most of amc's own time (see bench/search_quality.py's overhead), so
            its gradients are written out by hand (`_HandGrad`, checked against autograd's in
            the tests) and both optimisers are fused Adam called without the optimiser's
            per-call bookkeeping: 0.65x the time of the autograd update with fused Adam on 2
            threads, 0.72x on one (``bench/amc_update.py``, in bench/README.md).
            It runs on one thread or on ``update_threads`` (the evaluations' threads, which are
            idle meanwhile), whichever its recent updates ran quicker on (`_update_threads_now`);
            the rest of the agent runs on one."""
            threads = torch.get_num_threads()
            use = self._update_threads_now()
            t0 = time.perf_counter()
            torch.set_num_threads(use)
            try:
                self._train(gradient_steps, batch_size)
            finally:
                torch.set_num_threads(threads)
            seconds = time.perf_counter() - t0
            self.update_s += seconds
            self.update_counts[use] = self.update_counts.get(use, 0) + 1
            if gradient_steps > 0:
                times = self._update_secs.setdefault(use, [])
                times.append(seconds / gradient_steps)
                del times[:-UPDATE_TRIALS]
            self.on_checkpoint()  # after the update that follows every episode

        def _update_threads_now(self) -> int:
            """The threads for this update: ``update_threads`` or one, whichever ran the
            quicker median gradient step over its last UPDATE_TRIALS updates. The first
            updates alternate until both have that many; then every RECHECK_EVERY-th update
            runs on the other count, so that a change of the machine's state is seen. Which is
            quicker depends on the CPU and on what else runs on it: on a 2-core AMD EPYC
            family 26 the 300x300 update ran 0.8x as long on 2 threads as on one; on a
            family-25 one 1.36x as long in ``bench/amc_update.py``, and inside a search
            sometimes 0.76x, sometimes 1.29x (1.34 or 2.28 ms a gradient step against 1.77 on
            one thread). The thread count does not change the update's result (the same
            weights, bit for bit, on 1 and 2 threads here), only its time."""
            if self.update_threads_fixed is not None:
                return self.update_threads_fixed
            if self.update_threads <= 1:
                return 1
            choices = (self.update_threads, 1)
            done = [len(self._update_secs.get(n, ())) for n in choices]
            if min(done) < UPDATE_TRIALS:
                return choices[done.index(min(done))]
            speed = {n: float(np.median(self._update_secs[n])) for n in choices}
            quick = min(choices, key=speed.__getitem__)
            if sum(self.update_counts.values()) % RECHECK_EVERY == RECHECK_EVERY - 1:
                return choices[1 - choices.index(quick)]
            return quick

        def _hand_grads(self) -> tuple:
            nets = getattr(self, "_hand", None)
            if nets is None or nets[0].linears[0] is not self.actor.mu[0] \
                    or nets[1].linears[0] is not self.critic.q_networks[0][0]:
                if len(self.critic.q_networks) != 1:
                    raise RuntimeError("amc's update expects DDPG's single critic")
                nets = self._hand = (_HandGrad(self.actor.mu),
                                     _HandGrad(self.critic.q_networks[0]))
            return nets

        def _train(self, gradient_steps: int, batch_size: int) -> None:
            """``gradient_steps`` steps (AMC: one per stored transition; see
            `AMCSearcher.gradient_steps`). The critic regresses the reward
            (mean square error); then the actor ascends the updated critic's value of its own
            action, plus ``actor_reg`` times the mean square of its pre-tanh activation beyond
            +-ACTOR_BOUND. Same losses, order and result as `_train_autograd`."""
            self.policy.set_training_mode(True)
            self._update_learning_rate([self.actor.optimizer, self.critic.optimizer])
            actor, critic = self._hand_grads()
            n_obs = self.actor.mu[0].in_features
            reg = getattr(self, "actor_reg", 0.0)  # agents saved before it had none
            with torch.no_grad():
                for _ in range(gradient_steps):
                    self._n_updates += 1
                    obs, actions, rewards = self._sample(batch_size)
                    n = obs.shape[0]
                    ins, pres = critic.forward(torch.cat([obs, actions], 1))
                    # d/dq of mean((q - r)^2)
                    critic.backward(ins, pres, (pres[-1] - rewards).mul_(2.0 / n))
                    _adam_step(self.critic.optimizer, critic)
                    a_ins, a_pres = actor.forward(obs)
                    pre = a_pres[-1]  # before the final tanh
                    act = torch.tanh(pre)
                    ins, pres = critic.forward(torch.cat([obs, act], 1))
                    # d/dq of -mean(q), back to the critic's action input only
                    d_in = critic.backward(ins, pres, torch.full_like(pres[-1], -1.0 / n),
                                           weight_grads=False, input_grad=True)
                    d_pre = d_in[:, n_obs:] * (1.0 - act * act)
                    if reg:  # keeps the tanh out of saturation (see the module's docstring)
                        over = (pre.abs() - ACTOR_BOUND).clamp_(min=0.0)
                        d_pre += (2.0 * reg / pre.numel()) * over * torch.sign(pre)
                    actor.backward(a_ins, a_pres, d_pre)
                    _adam_step(self.actor.optimizer, actor)
            self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")

        def _sample(self, batch_size: int) -> tuple:
            """The observations, actions and rewards of ``self.replay_buffer.sample`` (the
            same draws from numpy's global generator, so the same rows), without the rest of
            its batch: next observations and dones (every transition here is terminal), the
            normalisation hooks and five tensor copies, ~0.1 ms of a gradient step. Buffers
            it does not know (memory-optimised, normalised envs) go through ``sample``."""
            from stable_baselines3.common.buffers import ReplayBuffer

            rb = self.replay_buffer
            if type(rb) is not ReplayBuffer or rb.optimize_memory_usage \
                    or self._vec_normalize_env is not None:
                data = rb.sample(batch_size, env=self._vec_normalize_env)
                return data.observations, data.actions, data.rewards
            rows = np.random.randint(0, rb.buffer_size if rb.full else rb.pos, size=batch_size)
            envs = np.random.randint(0, high=rb.n_envs, size=(batch_size,))
            return (torch.from_numpy(rb.observations[rows, envs, :]),
                    torch.from_numpy(rb.actions[rows, envs, :]),
                    torch.from_numpy(rb.rewards[rows, envs].reshape(-1, 1)))

        def _train_autograd(self, gradient_steps: int, batch_size: int) -> None:
            """The same update through autograd and the optimisers' `step`: the reference that
            `_train` is checked against (tests) and timed against (bench/amc_update.py)."""
            import torch.nn.functional as F

            self.policy.set_training_mode(True)
            self._update_learning_rate([self.actor.optimizer, self.critic.optimizer])
            for _ in range(gradient_steps):
                self._n_updates += 1
                data = self.replay_buffer.sample(batch_size, env=self._vec_normalize_env)
                critic_loss = sum(F.mse_loss(q, data.rewards)
                                  for q in self.critic(data.observations, data.actions))
                self.critic.optimizer.zero_grad()
                critic_loss.backward()
                self.critic.optimizer.step()
                features = self.actor.extract_features(data.observations,
                                                       self.actor.features_extractor)
                pre = self.actor.mu[:-1](features)  # before the final tanh
                actor_loss = -self.critic.q1_forward(data.observations,
                                                     torch.tanh(pre)).mean()
                reg = getattr(self, "actor_reg", 0.0)
                if reg:
                    over = (pre.abs() - ACTOR_BOUND).clamp(min=0.0)
                    actor_loss = actor_loss + reg * over.pow(2).mean()
                self.actor.optimizer.zero_grad()
                # only the actor's gradients: autograd skips the critic's weight gradients
                actor_loss.backward(inputs=list(self.actor.parameters()))
                self.actor.optimizer.step()
            self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")

        def _excluded_save_params(self) -> list[str]:
            # hooks are closures over the running study; RNG and counters go in state.json
            # and the threads are the resuming caller's choice
            return [*super()._excluded_save_params(), "on_episode", "on_checkpoint",
                    "should_stop", "rng", "_episode", "update_threads", "_hand",
                    "update_threads_fixed", "_update_secs", "update_counts", "update_s"]

        def amc_state(self) -> dict:
            return {"sigma_scaled": self.sigma_scaled, "baseline": self.baseline,
                    "episodes_done": self.episodes_done, "candidates_new": self.candidates_new,
                    "episodes_moved": getattr(self, "episodes_moved", 0),
                    "episodes_seeded": getattr(self, "episodes_seeded", 0),
                    # for the record only (a resumed agent times its own updates again)
                    "update_counts": {str(k): v for k, v in sorted(self.update_counts.items())},
                    "update_s": self.update_s,
                    "rng": self.rng.bit_generator.state,
                    "np_global": np.random.get_state(),
                    "torch": torch.get_rng_state().numpy().tolist()}

        def set_amc_state(self, state: dict) -> None:
            self._init_hooks()
            self.rng = np.random.default_rng()
            self.sigma_scaled, self.baseline = state["sigma_scaled"], state["baseline"]
            # checkpoints written before the noise could grow again lack these
            self.sigma_max_scaled = getattr(self, "sigma_max_scaled", 1.0)
            self.sigma_growth = getattr(self, "sigma_growth", 0.95 ** -4)
            self.episodes_done = state["episodes_done"]
            self.candidates_new = state["candidates_new"]
            self.episodes_moved = state.get("episodes_moved", 0)  # absent before moves
            self.episodes_seeded = state.get("episodes_seeded", 0)  # absent before seeds
            self.rng.bit_generator.state = state["rng"]
            np.random.set_state(state["np_global"])
            torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))

    return AMCDDPG


def check_update_ratio(value: float) -> float:
    """``--amc-update-ratio``: gradient steps an episode per group, in (0, 4] (NaN refused),
    or a `UserError` that says so."""
    if not 0 < value <= 4:
        raise UserError(f"`--amc-update-ratio` must be in (0, 4] (1: AMC's one gradient step "
                        f"per group), got {value}")
    return float(value)


def check_actor_reg(value: float) -> float:
    """``--amc-actor-reg``: a weight >= 0 (NaN refused), or a `UserError` that says so."""
    if not value >= 0:
        raise UserError(f"`--amc-actor-reg` must be >= 0 (0 turns the penalty off), got {value}")
    return float(value)


class AMCSearcher(Searcher):
    """``--trials N`` = N evaluated candidates in total, as for every searcher: the agent runs
    episodes until N of them have evaluated a policy no earlier episode had (one that repeats a
    policy moves to a new neighbour, or with ``repeats="replay"`` is served from the cache and
    costs no evaluation), at most ``max_episodes_per_trial`` x N episodes. Checkpoints (agent,
    replay buffer, RNG states) every ``checkpoint_every`` episodes (20) under the study's
    ``amc/`` folder. A checkpoint costs about 12 ms here (SB3's zip and two synced JSON files);
    every 5 episodes that was a tenth of amc's own time in a 300-candidate search. A resumed
    agent replays the episodes after its checkpoint from the candidate cache, paying their
    updates (~15 ms each) but no evaluation, so the sparser checkpoints cost a resume well under
    a second."""

    name = "amc"
    max_episodes_per_trial = 5

    def __init__(self, space, predictor, budget_ms, *, seed: int = 0, reward: str = "acc",
                 warmup_episodes: int = 10, action: str = "share", actor_reg: float = ACTOR_REG,
                 repeats: str = "move", checkpoint_every: int = 20,
                 update_ratio: float = UPDATE_RATIO, warmup_policies: str = "seeds"):
        super().__init__(space, predictor, budget_ms, seed=seed)
        if repeats not in REPEATS:
            raise ValueError(f"repeats must be one of {REPEATS}, got {repeats!r}")
        self.reward, self.warmup_episodes, self.action = reward, warmup_episodes, action
        self.actor_reg = check_actor_reg(actor_reg)
        self.repeats, self.checkpoint_every = repeats, checkpoint_every
        self.update_ratio = check_update_ratio(update_ratio)
        if warmup_policies not in WARMUP_POLICIES:
            raise ValueError(f"warmup_policies must be one of {WARMUP_POLICIES}, "
                             f"got {warmup_policies!r}")
        self.warmup_policies = warmup_policies

    def options(self) -> dict:
        out = {"reward": self.reward, "warmup_episodes": self.warmup_episodes,
               "action": self.action}
        if self.actor_reg:  # absent from studies made before it existed (= 0)
            out["actor_reg"] = self.actor_reg
        if self.repeats != "replay":  # absent from studies made before moves existed
            out["repeats"] = self.repeats
        if self.update_ratio != 1.0:  # absent: AMC's one step per group, as studies before
            out["update_ratio"] = self.update_ratio
        if self.warmup_policies != "random":  # absent from studies made before seeds existed
            out["warmup_policies"] = self.warmup_policies
        return out

    def first_policies(self) -> list[Policy]:
        """What the first episodes evaluate in place of the policies they build: with
        ``warmup_policies="seeds"``, evolution's seeds (`seed_policies`: the uniform policy at
        the budget, then for each group that policy with the group kept whole); none with
        ``"random"`` (AMC)."""
        return self.seeds() if self.warmup_policies == "seeds" else []

    def gradient_steps(self) -> int:
        """Gradient steps after each episode: ``update_ratio`` x the groups (AMC: one per
        group, i.e. per stored transition), at least one."""
        return max(1, round(self.update_ratio * len(self.space)))

    def make_env(self, evaluate, known=None):
        """The env; ``known`` (the study's: whether a policy was evaluated) moves repeated
        policies to new neighbours where ``repeats="move"``."""
        return PruningEnv(self.space, self.predictor, self.budget_ms, evaluate,
                          reward=self.reward, action=self.action, seed=self.seed,
                          known=known if self.repeats == "move" else None,
                          first=self.first_policies())

    def make_agent(self, env):
        """A fresh agent with AMC's settings (see the module's docstring for deviations)."""
        T = len(self.space)
        return make_agent_class()(
            "MlpPolicy", env, learning_rate=1e-4, critic_lr=1e-3, buffer_size=100 * T,
            learning_starts=self.warmup_episodes * T, batch_size=64, tau=0.01, gamma=1.0,
            train_freq=(1, "episode"), gradient_steps=self.gradient_steps(),
            policy_kwargs=policy_kwargs(),
            sigma=0.5, sigma_decay=0.95, sigma_min=0.1, warmup_episodes=self.warmup_episodes,
            actor_reg=self.actor_reg,
            seed=self.seed, device="cpu", verbose=0)

    def run(self, ctx: SearchContext) -> None:
        import torch

        # SB3 on several threads crawls on small nets: the agent acts on one thread, and the
        # evaluations and its updates run on the threads the caller chose (`--threads`)
        eval_threads = torch.get_num_threads()

        def evaluate(policy, episode):
            torch.set_num_threads(eval_threads)
            try:
                return ctx.evaluate(policy, episode)
            finally:
                torch.set_num_threads(1)

        torch.set_num_threads(1)
        try:
            self._run(ctx, evaluate, eval_threads)
        finally:
            torch.set_num_threads(eval_threads)

    def _run(self, ctx: SearchContext, evaluate, threads: int) -> None:
        T = len(self.space)
        env = self.make_env(evaluate, ctx.known)
        cls = make_agent_class()
        folder = Path(ctx.state_dir)
        folder.mkdir(parents=True, exist_ok=True)
        latest = folder / "latest.json"
        if latest.is_file():
            ckpt = folder / json.loads(latest.read_text())["dir"]
            agent = cls.load(ckpt / "agent.zip", env=env, device="cpu")
            agent.load_replay_buffer(ckpt / "replay.pkl")
            state = json.loads((ckpt / "state.json").read_text())
            state["np_global"] = pickle.loads(bytes.fromhex(state["np_global"]))
            agent.set_amc_state(state)
            env.episode = agent.episodes_done
            log.info("amc: resumed from episode %d", agent.episodes_done)
        else:
            agent = self.make_agent(env)
        max_episodes = self.max_episodes_per_trial * ctx.n_trials

        def finished() -> bool:
            return agent.candidates_new >= ctx.n_trials or agent.episodes_done >= max_episodes

        if finished():
            return

        def on_episode(info):
            # a replayed episode (after a resume) was already counted by the study
            if info.get("new") and info["candidate"].trial not in ctx.done_trials:
                ctx.on_candidate(info["candidate"])

        def on_checkpoint():
            if agent.episodes_done % self.checkpoint_every == 0 or finished():
                self._save(agent, folder)

        agent.on_episode, agent.on_checkpoint = on_episode, on_checkpoint
        agent.update_threads = threads
        # SB3's default logger makes an empty SB3-<date> folder in the temp dir on every learn()
        from stable_baselines3.common.logger import Logger
        agent.set_logger(Logger(folder=None, output_formats=[]))
        agent.should_stop = finished
        agent.learn(total_timesteps=(max_episodes - agent.episodes_done) * T,
                    reset_num_timesteps=False)
        if agent.candidates_new < ctx.n_trials:
            log.warning("amc: stopped after %d episodes with %d distinct candidates of the %d "
                        "asked for: the agent keeps proposing policies it has already tried",
                        agent.episodes_done, agent.candidates_new, ctx.n_trials)

    @staticmethod
    def _save(agent, folder: Path) -> None:
        """Agent, replay buffer and RNG states go to a fresh folder, flushed to the disk;
        then ``latest.json`` is switched to it in one atomic write, so a kill (or a power cut)
        at any point leaves one consistent checkpoint. Older checkpoint folders are removed
        afterwards."""
        from .._io import fsync_path, write_json

        name = f"ckpt-{agent.episodes_done:06d}"
        ckpt = folder / name
        if ckpt.exists():
            shutil.rmtree(ckpt)
        ckpt.mkdir()
        agent.save(ckpt / "agent.zip")
        agent.save_replay_buffer(ckpt / "replay.pkl")
        for written in ("agent.zip", "replay.pkl"):  # SB3 writes them in place
            fsync_path(ckpt / written)
        state = agent.amc_state()
        state["np_global"] = pickle.dumps(state["np_global"]).hex()
        write_json(ckpt / "state.json", state)  # (fsyncs the folder's entries too)
        write_json(folder / "latest.json", {"dir": name})
        for old in folder.glob("ckpt-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
