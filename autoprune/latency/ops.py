"""Prunable-op signatures: what a latency table is keyed by.

Every conv and linear layer of a model is one op. Its signature is (kind, in/out channels,
kernel, stride, padding, input H x W, the elementwise ops fused after it); the channel counts
depend on the policy through the groups that prune the layer's inputs and outputs. Everything
else (pooling, the odd add, the graph's fixed cost) is overhead, fitted by calibration.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..policy import Policy
from ..space import SearchSpace

log = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class OpSig:
    kind: str  # conv | depthwise | linear
    cin: int
    cout: int
    kernel: int
    stride: int
    padding: int
    h: int  # input height
    w: int  # input width
    post: str  # fused elementwise ops after the layer, e.g. "bn+relu", "bn+add+relu", ""

    @property
    def key(self) -> str:
        return (f"{self.kind}|{self.cin}x{self.cout}|k{self.kernel}s{self.stride}p{self.padding}"
                f"|{self.h}x{self.w}|{self.post or '-'}")

    @classmethod
    def from_key(cls, key: str) -> OpSig:
        kind, ch, ksp, hw, post = key.split("|")
        cin, cout = map(int, ch.split("x"))
        k, rest = ksp[1:].split("s")
        s, p = rest.split("p")
        h, w = map(int, hw.split("x"))
        return cls(kind, cin, cout, int(k), int(s), int(p), h, w, "" if post == "-" else post)

    @property
    def family(self) -> tuple:
        """Everything but the channel counts: ops of one family share an interpolation grid."""
        return (self.kind, self.kernel, self.stride, self.padding, self.h, self.w, self.post)


@dataclass(frozen=True)
class LayerOp:
    """One conv/linear layer of a model and where its channel counts come from."""

    name: str
    kind: str
    cin: int  # full widths
    cout: int
    in_group: str | None  # the group that prunes this layer's inputs (None: fixed)
    out_group: str | None  # the group that prunes its outputs (None: fixed, e.g. classifier)
    kernel: int
    stride: int
    padding: int
    h: int
    w: int
    post: str

    def sig(self, policy: Policy | dict) -> OpSig:
        get = policy.get
        cout = get(self.out_group, self.cout) if self.out_group else self.cout
        if self.kind == "depthwise":
            return OpSig(self.kind, cout, cout, self.kernel, self.stride, self.padding, self.h,
                         self.w, self.post)
        cin = get(self.in_group, self.cin) if self.in_group else self.cin
        return OpSig(self.kind, cin, cout, self.kernel, self.stride, self.padding, self.h,
                     self.w, self.post)


def _post_chains(model: nn.Module) -> dict[str, str]:
    """Layer name -> "+"-joined elementwise ops that directly follow it (via torch.fx).

    An add fed by two layers is given to the one computed first: both runtimes fuse it into
    that kernel. In a ResNet block with a projection shortcut that is ``conv2`` (conv + bn +
    add + relu), while the shortcut's 1x1 conv keeps its bn alone: TVM's fused tasks and
    onnxruntime's optimised graph both show it (tests/test_latency.py). Measured the other way
    round, a tuned TVM device's whole models ran kernels its table never measured. A model fx
    cannot trace gets no fused ops (calibration absorbs the difference)."""
    import torch.fx as fx

    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as e:  # user models may be untraceable; that costs accuracy, not function
        log.info("torch.fx cannot trace the model (%s); ops get no fused post-ops", e)
        return {}
    mods = dict(model.named_modules())
    order = {node: i for i, node in enumerate(graph.nodes)}
    adds = {operator.add, torch.add, operator.iadd}

    def layer(node):  # a conv/linear node
        return node.op == "call_module" and isinstance(mods.get(node.target),
                                                       (nn.Conv2d, nn.Linear))

    def feeding_layer(node):
        """The layer whose kernel could take an add on ``node``: ``node`` is its output, or
        its bn's, used by nothing else (None otherwise)."""
        if len(node.users) != 1:
            return None
        if node.op == "call_module" and isinstance(mods.get(node.target), nn.BatchNorm2d):
            src = node.args[0]
            return src if isinstance(src, fx.Node) and layer(src) and len(src.users) == 1 \
                else None
        return node if layer(node) else None

    out = {}
    for node in graph.nodes:
        if not layer(node):
            continue
        chain, cur = [], node
        while len(cur.users) == 1:
            user = next(iter(cur.users))
            mod = mods.get(user.target) if user.op == "call_module" else None
            if isinstance(mod, nn.BatchNorm2d) and not chain:
                step = "bn"
            elif (user.op == "call_function" and user.target in adds) or \
                    (user.op == "call_method" and user.target in ("add", "add_")):
                rivals = [f for a in user.args if isinstance(a, fx.Node) and a is not cur
                          and (f := feeding_layer(a)) is not None]
                if any(order[r] < order[node] for r in rivals):
                    break  # another layer, computed first, takes the add into its kernel
                step = "add"
            elif isinstance(mod, nn.ReLU) or (user.op == "call_function" and
                                               user.target in (F.relu, torch.relu)):
                step = "relu"
            elif isinstance(mod, nn.ReLU6) or (user.op == "call_function" and
                                                user.target is F.relu6):
                step = "relu6"
            elif isinstance(mod, nn.MaxPool2d) and chain and chain[-1] in ("relu", "relu6"):
                step = "maxpool"
            else:
                break
            chain.append(step)
            cur = user
            if step == "maxpool":
                break
        out[node.target] = "+".join(chain)
    return out


def model_ops(model: nn.Module, example_input: torch.Tensor, space: SearchSpace) -> list[LayerOp]:
    """The conv/linear layers of the *unpruned* ``model`` with the groups feeding them."""
    names = {m: n for n, m in model.named_modules()}
    shapes: dict[str, tuple[int, int]] = {}

    def hook(module, inputs, output):
        x = inputs[0]
        shapes[names[module]] = (x.shape[-2], x.shape[-1]) if x.dim() == 4 else (1, 1)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example_input[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    in_group, out_group = {}, {}
    for g in space.groups:
        for member in g.members:
            layer, side = member.rsplit(":", 1)
            (out_group if side == "out" else in_group)[layer] = g.name
    post = _post_chains(model)
    ops = []
    for name, module in model.named_modules():
        if name not in shapes:
            continue
        h, w = shapes[name]
        if isinstance(module, nn.Conv2d):
            if module.kernel_size[0] != module.kernel_size[1] or \
                    module.stride[0] != module.stride[1] or \
                    not isinstance(module.padding, tuple) or \
                    module.padding[0] != module.padding[1] or module.dilation != (1, 1):
                raise ValueError(f"layer {name}: only square, undilated convs are profiled")
            depthwise = module.groups > 1 and module.groups == module.in_channels == \
                module.out_channels
            if module.groups > 1 and not depthwise:
                raise ValueError(f"layer {name}: grouped convs other than depthwise are not "
                                 "profiled")
            ops.append(LayerOp(name, "depthwise" if depthwise else "conv", module.in_channels,
                               module.out_channels, in_group.get(name), out_group.get(name),
                               module.kernel_size[0], module.stride[0], module.padding[0], h, w,
                               post.get(name, "")))
        else:
            ops.append(LayerOp(name, "linear", module.in_features, module.out_features,
                               in_group.get(name), out_group.get(name), 1, 1, 0, 1, 1,
                               post.get(name, "")))
    return ops


def group_choices(space: SearchSpace, name: str | None, full: int, multiple: int) -> list[int]:
    """The channel counts a table measures for a group: the space's grid thinned to
    ``multiple`` (always keeping both bounds, so interpolation never extrapolates)."""
    if name is None:
        return [full]
    g = space.group(name)
    pts = [c for c in g.choices if c % multiple == 0]
    return sorted({g.min_channels, g.max_channels, *pts})


def grid_signatures(ops: list[LayerOp], space: SearchSpace, multiple: int) -> list[OpSig]:
    """Every distinct signature over the channel grid (the entries a table must hold)."""
    sigs = set()
    for op in ops:
        couts = group_choices(space, op.out_group, op.cout, multiple)
        if op.kind == "depthwise":
            sigs.update(op.sig({op.out_group: c}) for c in couts)
            continue
        cins = group_choices(space, op.in_group, op.cin, multiple)
        for ci in cins:
            for co in couts:
                sigs.add(op.sig({k: v for k, v in ((op.in_group, ci), (op.out_group, co))
                                 if k}))
    return sorted(sigs)


class OpModule(nn.Module):
    """One op in isolation, for measurement: layer, then its fused post-ops. With an ``add``
    the module takes a second input of the output's shape (the residual)."""

    def __init__(self, sig: OpSig):
        super().__init__()
        self.sig = sig
        if sig.kind == "linear":
            self.layer = nn.Linear(sig.cin, sig.cout)
        else:
            groups = sig.cin if sig.kind == "depthwise" else 1
            self.layer = nn.Conv2d(sig.cin, sig.cout, sig.kernel, sig.stride, sig.padding,
                                   groups=groups, bias=False)
        steps = sig.post.split("+") if sig.post else []
        self.bn = nn.BatchNorm2d(sig.cout) if "bn" in steps else None
        self.add = "add" in steps
        self.act = nn.ReLU() if "relu" in steps else nn.ReLU6() if "relu6" in steps else None
        self.pool = nn.MaxPool2d(2) if "maxpool" in steps else None
        self.eval()

    def example_inputs(self, batch: int = 1) -> tuple[torch.Tensor, ...]:
        s = self.sig
        x = torch.randn(batch, s.cin) if s.kind == "linear" else \
            torch.randn(batch, s.cin, s.h, s.w)
        if not self.add:
            return (x,)
        with torch.no_grad():
            y = self.layer(x)
        return (x, torch.randn_like(y))

    def forward(self, x, residual=None):
        y = self.layer(x)
        if self.bn is not None:
            y = self.bn(y)
        if residual is not None:
            y = y + residual
        if self.act is not None:
            y = self.act(y)
        if self.pool is not None:
            y = self.pool(y)
        return y
