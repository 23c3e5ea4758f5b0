"""The search space: coupled channel groups of a model, their bounds and channel grid.

Groups come from torch-pruning's `DependencyGraph`: a conv's output channels, its BN, its
consumers' input channels and every conv tied to it by a residual add must be pruned together.
The classifier's outputs and the network input are never pruned. Bounds and rounding come from
``search_spaces/<family>.yaml``.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserError
from .policy import Policy

SEARCH_SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
_SPEC_KEYS = {"min_keep", "max_keep", "round_to", "ignored_layers", "overrides", "description"}
_OVERRIDE_KEYS = {"match", "min_keep", "max_keep", "round_to"}


@dataclass(frozen=True)
class GroupBounds:
    """Bounds for the groups whose name matches ``match`` (fnmatch pattern)."""

    match: str
    min_keep: float | None = None
    max_keep: float | None = None
    round_to: int | None = None


@dataclass(frozen=True)
class SpaceSpec:
    """The contents of ``search_spaces/<family>.yaml``."""

    min_keep: float = 0.25
    max_keep: float = 1.0
    round_to: int = 1
    ignored_layers: tuple[str, ...] = ()
    overrides: tuple[GroupBounds, ...] = ()
    source: str = "<defaults>"

    def __post_init__(self):
        _check_bounds(self.min_keep, self.max_keep, self.round_to, where=self.source)

    @classmethod
    def load(cls, path: str | Path) -> SpaceSpec:
        from ._io import read_yaml

        raw = read_yaml(path, what="search-space file", option="--space")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: Any, *, source: str) -> SpaceSpec:
        if not isinstance(raw, dict):
            raise UserError(f"search-space file {source!r} must hold a mapping of keys "
                            f"({', '.join(sorted(_SPEC_KEYS))}), got {type(raw).__name__}")
        unknown = sorted(set(raw) - _SPEC_KEYS)
        if unknown:
            raise UserError(f"search-space file {source!r}: unknown key {unknown[0]!r}; allowed "
                            f"keys are {', '.join(sorted(_SPEC_KEYS))}")
        kw: dict[str, Any] = {"source": source}
        for key in ("min_keep", "max_keep"):
            if key in raw:
                kw[key] = _number(raw[key], key, source)
        if "round_to" in raw:
            kw["round_to"] = _integer(raw["round_to"], "round_to", source)
        if "ignored_layers" in raw:
            layers = raw["ignored_layers"] or []
            if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
                raise UserError(f"search-space file {source!r}: key 'ignored_layers' must be a "
                                "list of module-name patterns, e.g. ['fc', 'layer1.*']")
            kw["ignored_layers"] = tuple(layers)
        overrides = []
        for i, item in enumerate(raw.get("overrides") or []):
            key = f"overrides[{i}]"
            if not isinstance(item, dict) or not isinstance(item.get("match"), str):
                raise UserError(f"search-space file {source!r}: key '{key}' must be a mapping "
                                "with a 'match' pattern")
            bad = sorted(set(item) - _OVERRIDE_KEYS)
            if bad:
                raise UserError(f"search-space file {source!r}: unknown key '{key}.{bad[0]}'; "
                                f"allowed: {', '.join(sorted(_OVERRIDE_KEYS))}")
            o = GroupBounds(
                match=item["match"],
                min_keep=_number(item["min_keep"], f"{key}.min_keep", source)
                if "min_keep" in item else None,
                max_keep=_number(item["max_keep"], f"{key}.max_keep", source)
                if "max_keep" in item else None,
                round_to=_integer(item["round_to"], f"{key}.round_to", source)
                if "round_to" in item else None)
            overrides.append(o)
        kw["overrides"] = tuple(overrides)
        return cls(**kw)

    @classmethod
    def for_family(cls, family: str) -> SpaceSpec:
        path = SEARCH_SPACES_DIR / f"{family}.yaml"
        if not path.is_file():
            path = SEARCH_SPACES_DIR / "default.yaml"
        return cls.load(path)

    def bounds_for(self, group: str) -> tuple[float, float, int]:
        lo, hi, r = self.min_keep, self.max_keep, self.round_to
        for o in self.overrides:
            if fnmatch.fnmatchcase(group, o.match):
                lo = o.min_keep if o.min_keep is not None else lo
                hi = o.max_keep if o.max_keep is not None else hi
                r = o.round_to if o.round_to is not None else r
        _check_bounds(lo, hi, r, where=f"{self.source} (group {group})")
        return lo, hi, r


def _number(v: Any, key: str, source: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UserError(f"search-space file {source!r}: key '{key}' must be a number, got {v!r}")
    return float(v)


def _integer(v: Any, key: str, source: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise UserError(f"search-space file {source!r}: key '{key}' must be an integer, "
                        f"got {v!r}")
    return v


def _check_bounds(lo: float, hi: float, r: int, *, where: str) -> None:
    if not 0.0 < lo <= hi <= 1.0:
        raise UserError(f"{where}: need 0 < min_keep <= max_keep <= 1, got min_keep={lo}, "
                        f"max_keep={hi}; fix key 'min_keep'/'max_keep'")
    if r < 1:
        raise UserError(f"{where}: key 'round_to' must be >= 1, got {r}")


@dataclass(frozen=True)
class PrunableGroup:
    """Channels pruned together, named by the qualified name of their root module (the first
    conv/linear, in module order, whose outputs the group prunes)."""

    name: str
    channels: int  # full width
    min_channels: int
    max_channels: int
    round_to: int
    kind: str  # "conv", "depthwise" or "linear": the root module's type
    members: tuple[str, ...]  # "module:out" / "module:in" for every coupled conv and linear
    macs_share: float  # fraction of the model's MACs in layers this group touches

    def __post_init__(self):
        if not 1 <= self.min_channels <= self.max_channels <= self.channels:
            raise ValueError(f"group {self.name}: need 1 <= min <= max <= channels, got "
                             f"{self.min_channels}, {self.max_channels}, {self.channels}")

    @property
    def choices(self) -> tuple[int, ...]:
        """The channel grid: multiples of ``round_to`` within the bounds, plus both bounds."""
        r = self.round_to
        grid = {self.min_channels, self.max_channels}
        grid.update(range(math.ceil(self.min_channels / r) * r, self.max_channels + 1, r))
        return tuple(sorted(c for c in grid if self.min_channels <= c <= self.max_channels))

    def snap_down(self, channels: float) -> int:
        """The widest grid point not above ``channels`` (the minimum if it is below)."""
        below = [c for c in self.choices if c <= channels + 1e-9]
        return below[-1] if below else self.choices[0]

    def keep_for_ratio(self, ratio: float) -> int:
        """The grid point nearest ``ratio * channels`` (ties go to the larger width)."""
        target = ratio * self.channels
        return min(self.choices, key=lambda c: (abs(c - target), -c))

    @property
    def convs(self) -> tuple[str, ...]:
        return tuple(m.split(":")[0] for m in self.members)


@dataclass(frozen=True)
class SearchSpace:
    groups: tuple[PrunableGroup, ...]
    input_shape: tuple[int, ...]
    total_macs: int
    total_params: int
    ignored_layers: tuple[str, ...] = ()
    spec_source: str = "<defaults>"
    family: str = "default"

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: nn.Module, example_input: torch.Tensor,
                   spec: SpaceSpec | None = None, *, family: str = "default",
                   round_to: int | None = None,
                   coupled_round_to: int | None = None) -> SearchSpace:
        """Discover the coupled groups of ``model``; ``round_to`` overrides the spec's.

        ``coupled_round_to`` (the device's channel multiple): a group whose channels several
        layers write (a residual stream) has its grid points between its bounds on at least
        this multiple, however fine ``round_to`` is. The runtime pads such a stream to its
        multiple inside the model, while each op measured alone for the latency table does
        not: on cpu-ort (2026-11-22) ResNet-20's stage-3 stream at 20, 28 or 36 channels ran
        as 24, 32 or 40 do, 5 to 6% over its prediction, and at budget 0.3 on a 4-channel
        grid the searchers' best candidates nearly all had it at 28 and measured 1.07 to 1.18 x
        the budget. A layer whose outputs only its own block reads is priced right at any
        width."""
        from .count import count_params, layer_macs

        spec = spec or SpaceSpec()
        found = discover_groups(model, example_input, spec.ignored_layers)
        macs = layer_macs(model, example_input)
        total = sum(macs.values())
        groups = []
        for name, channels, kind, members in found:
            lo, hi, r = spec.bounds_for(name)
            if round_to is not None:
                r = round_to
            r = min(r, channels)
            min_c = min(channels, max(r, math.ceil(lo * channels / r) * r))
            max_c = channels if hi >= 1.0 else max(min_c, math.floor(hi * channels / r) * r)
            if coupled_round_to and sum(m.endswith(":out") for m in members) > 1:
                r = max(r, min(coupled_round_to, channels))  # its bounds stay where they were
            touched = {m.split(":")[0] for m in members}
            share = sum(v for k, v in macs.items() if k in touched) / max(1, total)
            groups.append(PrunableGroup(name, channels, min_c, max_c, r, kind, members,
                                        round(share, 6)))
        return cls(tuple(groups), tuple(example_input.shape), total, count_params(model),
                   tuple(spec.ignored_layers), spec.source, family)

    # ------------------------------------------------------------------ queries
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups)

    def group(self, name: str) -> PrunableGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def __len__(self) -> int:
        return len(self.groups)

    # ------------------------------------------------------------------ policies
    def policy_from_ratios(self, ratios: Sequence[float] | dict[str, float]) -> Policy:
        """Keep ratios (one per group, in order, or by name) -> a `Policy` on the grid."""
        if isinstance(ratios, dict):
            unknown = sorted(set(ratios) - set(self.names))
            if unknown:
                raise UserError(f"unknown group {unknown[0]!r}; groups are "
                                f"{', '.join(self.names)}")
            ratios = [ratios.get(n, 1.0) for n in self.names]
        ratios = list(ratios)
        if len(ratios) != len(self.groups):
            raise ValueError(f"need {len(self.groups)} ratios, got {len(ratios)}")
        return Policy.from_dict({g.name: g.keep_for_ratio(float(r))
                                 for g, r in zip(self.groups, ratios, strict=True)})

    def uniform(self, ratio: float) -> Policy:
        return self.policy_from_ratios([ratio] * len(self.groups))

    def full(self) -> Policy:
        return Policy.from_dict({g.name: g.channels for g in self.groups})

    def smallest(self) -> Policy:
        return Policy.from_dict({g.name: g.min_channels for g in self.groups})

    def validate(self, policy: Policy, *, source: str = "policy") -> Policy:
        """Refuse unknown groups and channel counts outside the bounds; fill unnamed groups
        with their full width (a partial policy prunes only what it names)."""
        unknown = [n for n in policy if n not in self.names]
        if unknown:
            raise UserError(f"{source} names unknown group {unknown[0]!r}; groups are "
                            f"{', '.join(self.names)}")
        for name in policy:
            g = self.group(name)
            keep = policy[name]
            if not g.min_channels <= keep <= g.max_channels:
                raise UserError(f"{source}: group {name!r} keeps {keep} channels, outside "
                                f"[{g.min_channels}, {g.max_channels}]; choose a count in range")
        full = self.full().to_dict()
        full.update(policy.to_dict())
        return Policy.from_dict(full)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["groups"] = [asdict(g) for g in self.groups]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchSpace:
        groups = tuple(PrunableGroup(**{**g, "members": tuple(g["members"])})
                       for g in d["groups"])
        return cls(groups, tuple(d["input_shape"]), d["total_macs"], d["total_params"],
                   tuple(d.get("ignored_layers", ())), d.get("spec_source", "<defaults>"),
                   d.get("family", "default"))


# ---------------------------------------------------------------------- discovery
def classifier_name(model: nn.Module, example_input: torch.Tensor) -> str | None:
    """The last conv/linear to run in a forward pass: the classifier, whose outputs are the
    model's outputs and are never pruned."""
    names = {m: n for n, m in model.named_modules()}
    order: list[str] = []
    handles = [m.register_forward_hook(lambda mod, i, o: order.append(names[mod]))
               for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(example_input[:1])
    finally:
        for h in handles:
            h.remove()
    return order[-1] if order else None


def _ignored_modules(model: nn.Module, example_input, patterns: Sequence[str]):
    named = dict(model.named_modules())
    ignored = set()
    clf = classifier_name(model, example_input)
    if clf is not None:
        ignored.add(clf)
    for pat in patterns:
        hits = [n for n in named if n and fnmatch.fnmatchcase(n, pat)]
        ignored.update(hits)
    return ignored


def discover_groups(model: nn.Module, example_input: torch.Tensor,
                    ignored_patterns: Sequence[str] = ()):
    """[(root name, channels, kind, members)] in module order, via torch-pruning."""
    import torch_pruning as tp

    named = dict(model.named_modules())
    order = {n: i for i, n in enumerate(named)}
    names = {m: n for n, m in named.items()}
    ignored = _ignored_modules(model, example_input, ignored_patterns)
    was_training = model.training
    model.eval()
    try:
        # The dependency graph traces autograd: it must not run under torch.no_grad().
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(model, example_input[:1], verbose=False)
        groups = dg.get_all_groups(ignored_layers=[named[n] for n in ignored],
                                   root_module_types=(nn.Conv2d, nn.Linear))
        found, seen = [], set()
        for group in groups:
            members, roots = set(), []
            for item in group:
                module = item.dep.target.module
                name = names.get(module)
                if name is None:
                    continue
                fn = item.dep.handler.__name__
                side = "out" if "out_channels" in fn else "in"
                if isinstance(module, (nn.Conv2d, nn.Linear)):  # BNs follow their conv
                    members.add(f"{name}:{side}")
                    if side == "out":
                        roots.append(name)
            if not roots or any(r in ignored for r in roots):
                continue  # touches an ignored layer's outputs (or none we can name): fixed
            root = min(roots, key=order.__getitem__)
            if root in seen:
                continue
            seen.add(root)
            module = named[root]
            channels = module.out_channels if isinstance(module, nn.Conv2d) else \
                module.out_features
            if isinstance(module, nn.Conv2d) and module.groups > 1 and \
                    module.groups == module.in_channels:
                kind = "depthwise"
            else:
                kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
            found.append((root, channels, kind,
                          tuple(sorted(members, key=lambda m: (order[m.split(":")[0]], m)))))
    finally:
        model.train(was_training)
    found.sort(key=lambda g: order[g[0]])
    return found
