"""`apply_policy`: a new, physically smaller model. torch-pruning is used only here.

The input model is never mutated: we prune a deep copy. Each group named by the policy keeps
exactly its channel count: the channels with the highest importance (scored over the whole
coupled group, so a residual stage is ranked by every conv in it) survive.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .policy import Policy

log = logging.getLogger(__name__)


def _importance(name: str):
    import torch_pruning as tp

    imp = tp.importance
    # Fresh objects each call: torch-pruning keeps state (and mutable defaults) on them.
    factories: dict[str, Callable[[], object]] = {
        "l1": lambda: imp.GroupMagnitudeImportance(p=1),
        "l2": lambda: imp.GroupMagnitudeImportance(p=2),
        "bn-scale": lambda: imp.BNScaleImportance(),
        "taylor": lambda: imp.GroupTaylorImportance(),
        "fpgm": lambda: imp.FPGMImportance(),
        "random": lambda: imp.RandomImportance(),
    }
    if name not in factories:
        raise UserError(f"unknown importance {name!r}; choose one of {', '.join(IMPORTANCE)}")
    return factories[name]()


IMPORTANCE = ("l1", "l2", "bn-scale", "taylor", "fpgm", "random")


def _default_input(model: nn.Module) -> torch.Tensor:
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise UserError("the model has no Conv2d layer; autoprune prunes CNNs")
    return torch.zeros(1, first.in_channels, 32, 32)


def apply_policy(model: nn.Module, policy: Policy, *, importance: str = "l1",
                 example_input: torch.Tensor | None = None,
                 batch: tuple[torch.Tensor, torch.Tensor] | None = None,
                 seed: int = 0) -> nn.Module:
    """Return a pruned deep copy of ``model`` in which every group in ``policy`` keeps exactly
    ``policy[group]`` channels (groups not named are left whole).

    ``example_input`` traces the dependency graph (default: 1x32x32 with the first conv's input
    channels, fine for the zoo's global-pooling models). ``batch`` (inputs, labels) is needed by
    the ``taylor`` importance, which scores channels by |weight x gradient| on it.
    """
    import torch_pruning as tp

    scorer = _importance(importance)
    if importance == "taylor" and batch is None:
        raise UserError("importance 'taylor' needs a batch of data (inputs, labels); pass "
                        "`batch=` or choose another importance")
    pruned = copy.deepcopy(model)
    was_training = model.training
    pruned.eval()
    x = example_input if example_input is not None else _default_input(pruned)
    named = dict(pruned.named_modules())
    for name in policy:
        if name not in named:
            raise UserError(f"policy names group {name!r}, which is not a module of this "
                            "model; build the policy from this model's search space")
    torch.manual_seed(seed)  # the 'random' importance draws from torch's generator
    with torch.enable_grad():  # the dependency graph is traced through autograd
        dg = tp.DependencyGraph().build_dependency(pruned, x[:1], verbose=False)
        if importance == "taylor":
            inputs, labels = batch
            pruned.zero_grad()
            F.cross_entropy(pruned(inputs), labels).backward()
        for name in policy:
            module = named[name]
            keep = policy[name]
            full = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
            if keep > full:
                raise UserError(f"policy keeps {keep} channels of group {name!r}, which has "
                                f"only {full}; choose at most {full}")
            if keep == full:
                continue
            fn = tp.prune_conv_out_channels if isinstance(module, nn.Conv2d) \
                else tp.prune_linear_out_channels
            group = dg.get_pruning_group(module, fn, idxs=list(range(full)))
            scores = scorer(group)
            if scores is None:  # the scorer found nothing it can rank (e.g. no BN): by L1
                scores = _importance("l1")(group)
            drop = torch.argsort(scores.detach().float(), stable=True)[: full - keep]
            group = dg.get_pruning_group(module, fn, idxs=sorted(drop.tolist()))
            if not dg.check_pruning_group(group):
                raise UserError(f"group {name!r} cannot keep {keep} of {full} channels "
                                "(torch-pruning refused the group); raise its keep")
            group.prune()
    pruned.zero_grad(set_to_none=True)
    pruned.train(was_training)
    return pruned
