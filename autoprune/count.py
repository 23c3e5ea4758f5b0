"""MACs and parameter counts for any model (full or pruned), measured by one forward pass.

A conv costs ``out_h * out_w * out_channels * (in_channels / groups) * kh * kw`` MACs, a linear
``in * out`` per sample; BN, activations and pooling are not counted (the usual convention of
AMC, NetAdapt and torch-pruning's reports, so figures compare).
"""

from __future__ import annotations

import torch
from torch import nn


def layer_macs(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Per-layer MACs (conv and linear) for one sample, keyed by qualified module name."""
    names = {m: n for n, m in model.named_modules()}
    out: dict[str, int] = {}

    def hook(module, inputs, output):
        per_sample = output.shape[0] if output.dim() > 1 else 1
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            macs = output.numel() // per_sample * (module.in_channels // module.groups) * kh * kw
        else:
            macs = output.numel() // per_sample * module.in_features
        out[names[module]] = out.get(names[module], 0) + int(macs)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return out


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    return sum(layer_macs(model, example_input).values())


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
