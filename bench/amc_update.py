"""amc's DDPG update alone: milliseconds for one episode's update (AMC: one gradient step per
group, batch 64, 300x300 actor and critic), the hand-written update the searcher runs against
the same update through autograd and the optimisers' ``step`` (``_train_autograd``, the
reference it is tested against), each on 1 and on 2 threads. Prints one JSON document.

    python bench/amc_update.py [--groups 12] [--episodes 40] [--rounds 5]

The agent is the searcher's own (``make_agent_class``), its replay buffer filled to AMC's 100
episodes with random transitions (the update's cost does not depend on their values). Between
updates the agent acts on one thread, as in a search; the "2 threads" figures include switching
the thread count in and out of each update, as ``AMCDDPG.train`` does. Each setting's thread
count is fixed here; a search times its updates on both and runs on the quicker
(``AMCDDPG._update_threads_now``), since which one that is depends on the CPU. The four settings
alternate round by round; the JSON gives the median and IQR of the round medians, and the
median of the per-round ratios hand-written / autograd.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from autoprune.search.amc import N_FEATURES, make_agent_class, policy_kwargs  # noqa: E402


class _Env(gym.Env):
    """Only the spaces matter: the update reads the replay buffer, never the env."""

    observation_space = spaces.Box(0.0, 1.0, (N_FEATURES,), np.float32)
    action_space = spaces.Box(0.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        return np.zeros(N_FEATURES, np.float32), {}

    def step(self, action):
        return np.zeros(N_FEATURES, np.float32), 0.0, True, False, {}


def main() -> int:
    from stable_baselines3.common.logger import Logger

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=12, help="gradient steps per episode "
                    "(ResNet-20 has 12 groups)")
    ap.add_argument("--episodes", type=int, default=40, help="updates timed per round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    T = args.groups
    agent = make_agent_class()(
        "MlpPolicy", _Env(), learning_rate=1e-4, critic_lr=1e-3, buffer_size=100 * T,
        learning_starts=0, batch_size=64, tau=0.01, gamma=1.0, train_freq=(1, "episode"),
        gradient_steps=-1, policy_kwargs=policy_kwargs(),
        actor_reg=1.0, seed=0, device="cpu", verbose=0)
    agent.set_logger(Logger(folder=None, output_formats=[]))
    rng = np.random.default_rng(0)
    for _ in range(100 * T):
        agent.replay_buffer.add(rng.random((1, N_FEATURES), dtype=np.float32),
                                rng.random((1, N_FEATURES), dtype=np.float32),
                                rng.uniform(-1, 1, (1, 1)).astype(np.float32),
                                np.array([rng.random()], np.float32), np.array([True]), [{}])
    obs = torch.zeros(1, N_FEATURES)
    hand_train = type(agent)._train
    settings = [(impl, threads) for impl in ("autograd", "hand") for threads in (1, 2)]
    rounds: dict[tuple, list[float]] = {s: [] for s in settings}
    for _ in range(args.rounds):
        for impl, threads in settings:
            # the instance attribute shadows the class's `_train` that `train` calls
            agent._train = agent._train_autograd if impl == "autograd" else \
                hand_train.__get__(agent)
            torch.set_num_threads(1)
            agent.update_threads = agent.update_threads_fixed = threads  # fixed, not chosen
            agent.train(T, 64)  # warm-up
            ts = []
            for _ in range(args.episodes):
                t0 = time.perf_counter()
                agent.train(T, 64)
                ts.append(time.perf_counter() - t0)
                with torch.no_grad():
                    agent.actor(obs)  # acting in between, on one thread
            rounds[impl, threads].append(statistics.median(ts) * 1000)
    out = {"groups": T, "episodes_per_round": args.episodes, "rounds": args.rounds,
           "torch": torch.__version__, "ms_per_episode_update": {}, "hand_over_autograd": {}}
    for (impl, threads), xs in rounds.items():
        q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
        name = f"{impl}_{threads}_thread{'s' if threads > 1 else ''}"
        out["ms_per_episode_update"][name] = {
            "median": round(statistics.median(xs), 2), "iqr": round(q[2] - q[0], 2),
            "rounds": [round(x, 2) for x in xs]}
        if impl == "hand":
            ratios = [h / a for h, a in zip(xs, rounds["autograd", threads], strict=True)]
            out["hand_over_autograd"][name.removeprefix("hand_")] = round(
                statistics.median(ratios), 3)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
