import copy
import json

import pytest
import torch
from torch import nn

from autoprune.count import count_macs, count_params, layer_macs
from autoprune.errors import UserError
from autoprune.export import check_onnx, export_onnx
from autoprune.models import ModelSpec, build_model
from autoprune.models.zoo import ZOO
from autoprune.policy import Policy
from autoprune.prune import IMPORTANCE, apply_policy
from autoprune.space import SearchSpace, SpaceSpec

X = torch.randn(4, 1, 16, 16)


def _space(name, **kw):
    spec = ModelSpec(name, in_channels=1, input_size=16)
    model = build_model(spec).eval()
    # Non-trivial BN statistics, so a wrong channel mapping shows up in the outputs.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return model, SearchSpace.from_model(model, X, SpaceSpec.for_family(spec.family), **kw)


def _conv_macs(model):
    return sum(v for k, v in layer_macs(model, X).items()
               if isinstance(dict(model.named_modules())[k], nn.Conv2d))


def _out_channels(model, name):
    m = dict(model.named_modules())[name]
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


EXPECTED_GROUPS = {"resnet20": 12, "resnet56": 30, "plain20": 19, "mobilenetv2": 25, "vgg11": 8}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_prunes(name, tmp_path):
    model, space = _space(name)
    assert len(space) == EXPECTED_GROUPS[name]
    assert len(set(space.names)) == len(space)
    clf = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    assert clf not in space.names  # classifier outputs are never pruned
    before = copy.deepcopy(model.state_dict())
    policy = space.uniform(0.5)
    pruned = apply_policy(model, policy, example_input=X)
    # the original is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # every group has exactly the policy's channels, output shape unchanged
    for g in space.groups:
        assert _out_channels(pruned, g.name) == policy[g.name]
    with torch.no_grad():
        assert pruned(X).shape == model(X).shape
    ratio = _conv_macs(pruned) / _conv_macs(model)
    # roughly a quarter: in and out channels both halve; depthwise convs only scale linearly.
    assert 0.2 < ratio < (0.32 if name == "mobilenetv2" else 0.3), ratio
    assert count_params(pruned) < 0.4 * count_params(model)
    # pruned -> ONNX -> onnxruntime equals PyTorch
    path = export_onnx(pruned, X[:1], tmp_path / "p.onnx")
    assert check_onnx(path, pruned, X) <= 1e-4
    # keep-all is the identity
    same = apply_policy(model, space.full(), example_input=X)
    with torch.no_grad():
        assert torch.equal(same(X), model(X))


def test_residual_convs_share_one_group():
    _, space = _space("resnet20")
    by_member = {}
    for g in space.groups:
        for m in g.members:
            if m.endswith(":out"):
                by_member[m.split(":")[0]] = g.name
    # stage 1: the stem and every block's second conv are added together
    assert {by_member[f"layer1.{i}.conv2"] for i in range(3)} == {"conv1"}
    assert by_member["conv1"] == "conv1"
    stage2 = {by_member[n] for n in ["layer2.0.downsample.0"] +
              [f"layer2.{i}.conv2" for i in range(3)]}
    assert stage2 == {"layer2.0.conv2"}
    # a block's first conv is its own group, tied to the second conv's inputs
    g = space.group("layer2.1.conv1")
    assert set(g.members) == {"layer2.1.conv1:out", "layer2.1.conv2:in"}
    assert abs(sum(x.macs_share for x in space.groups) - 1) > 0  # shares overlap by design
    assert 0 < space.group("conv1").macs_share < 1


def test_mobilenet_depthwise_follows_expansion():
    _, space = _space("mobilenetv2")
    g = space.group("features.1.conv.0")
    # the depthwise conv (in == out channels) and the projection's inputs go with it
    assert {"features.1.conv.3:out", "features.1.conv.6:in"} <= set(g.members)
    assert g.kind == "conv" and space.group("stem.0").kind == "conv"


@pytest.mark.parametrize("round_to", [1, 4, 8])
def test_rounding_honoured(round_to):
    _, space = _space("resnet20", round_to=round_to)
    for ratio in (0.27, 0.5, 0.61, 0.9):
        policy = space.uniform(ratio)
        for g in space.groups:
            keep = policy[g.name]
            assert g.min_channels <= keep <= g.max_channels
            assert keep % min(round_to, g.channels) == 0 or keep in (g.min_channels,
                                                                      g.max_channels)
    g = space.group("layer3.0.conv1")
    assert g.choices == tuple(range(max(16, round_to), 65, round_to))


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_residual_streams_keep_the_device_multiple_on_a_finer_grid(name):
    """`--round-to 4` on a device whose multiple is 8: a group that several layers write (a
    residual stream, which the runtime pads to its multiple inside the model) keeps its grid
    points on multiples of 8, within the same bounds; every other group gets the finer grid."""
    _, fine = _space(name, round_to=4)
    _, mixed = _space(name, round_to=4, coupled_round_to=8)
    streams = 0
    for f, m in zip(fine.groups, mixed.groups, strict=True):
        assert (m.min_channels, m.max_channels) == (f.min_channels, f.max_channels)
        if sum(x.endswith(":out") for x in m.members) > 1:
            streams += 1
            assert m.choices == tuple(c for c in f.choices
                                      if c % min(8, m.channels) == 0
                                      or c in (m.min_channels, m.max_channels))
        else:
            assert m.choices == f.choices
    assert streams >= 3  # one per stage at least
    # a coarser --round-to applies to every group
    _, coarse = _space(name, round_to=16, coupled_round_to=8)
    assert all(g.round_to == min(16, g.channels) for g in coarse.groups)
    # a study's config says so, so a study made before the rule is not resumed on it
    from types import SimpleNamespace

    from autoprune.cli import _space_config
    from autoprune.latency.devices import get_device

    cpu_ort = get_device("cpu-ort")  # multiple 8
    fine_cfg = _space_config(mixed, SimpleNamespace(round_to=4), cpu_ort)
    assert fine_cfg["round_to"] == 4 and fine_cfg["residual_round_to"] == 8
    assert "residual_round_to" not in _space_config(mixed, SimpleNamespace(round_to=8), cpu_ort)


def test_policy_from_ratios_and_bounds():
    _, space = _space("resnet20")
    p = space.policy_from_ratios([0.0] * len(space))
    assert p == space.smallest()
    assert space.policy_from_ratios([1.0] * len(space)) == space.full()
    assert space.policy_from_ratios({"conv1": 0.5})["conv1"] == 8
    with pytest.raises(UserError, match="unknown group 'nope'"):
        space.policy_from_ratios({"nope": 0.5})


def test_policy_json_round_trip(tmp_path):
    _, space = _space("resnet20")
    p = space.uniform(0.5)
    assert Policy.from_json(p.to_json()) == p
    path = p.save(tmp_path / "p.json")
    assert Policy.load(path) == p
    assert json.loads(path.read_text())["channels"]["conv1"] == 8
    assert hash(p) == hash(Policy.load(path))


def test_policy_validation():
    _, space = _space("resnet20")
    with pytest.raises(UserError, match="unknown group 'layer9.conv1'"):
        space.validate(Policy.from_dict({"layer9.conv1": 4}))
    with pytest.raises(UserError, match="outside \\[4, 16\\]"):
        space.validate(Policy.from_dict({"conv1": 2}))
    with pytest.raises(UserError, match="positive integers"):
        Policy.from_dict({"conv1": 0})
    partial = space.validate(Policy.from_dict({"conv1": 8}))
    assert partial["conv1"] == 8 and partial["layer3.2.conv1"] == 64


@pytest.mark.parametrize("importance", IMPORTANCE)
def test_importance_criteria(importance, digits):
    model, space = _space("resnet20")
    batch = (torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,)))
    pruned = apply_policy(model, space.uniform(0.5), importance=importance, example_input=X,
                          batch=batch)
    assert _out_channels(pruned, "layer2.0.conv2") == 16
    assert pruned(X).shape == (4, 10)


def test_l1_keeps_the_largest_filters():
    model, space = _space("plain20")
    conv = dict(model.named_modules())["layer3.2.conv2"]
    with torch.no_grad():
        conv.weight.mul_(0.01)
        conv.weight[:8].mul_(1000.0)  # make the first 8 filters clearly the largest
    pruned = apply_policy(model, Policy.from_dict({"layer3.2.conv2": 8}), example_input=X)
    kept = dict(pruned.named_modules())["layer3.2.conv2"].weight
    assert torch.allclose(kept, conv.weight[:8])


def test_taylor_needs_a_batch():
    model, space = _space("resnet20")
    with pytest.raises(UserError, match="needs a batch"):
        apply_policy(model, space.uniform(0.5), importance="taylor", example_input=X)


def test_macs_and_params_counts():
    model, space = _space("resnet20")
    # 272,474 for the 3-channel ResNet-20; a 1-channel stem has 16 * 9 * 2 fewer weights
    assert count_params(model) == space.total_params == 272474 - 16 * 9 * 2
    assert count_params(build_model(ModelSpec("resnet20"))) == 272474
    # conv1: 16 * 1 * 9 per pixel on 16x16; fc: 64 * 10
    per_layer = layer_macs(model, X)
    assert per_layer["conv1"] == 16 * 16 * 16 * 9 and per_layer["fc"] == 640
    assert count_macs(model, X) == space.total_macs


def test_user_model_space(tmp_path):
    f = tmp_path / "net.py"
    f.write_text(
        "from torch import nn\n"
        "def make(num_classes, in_channels):\n"
        "    return nn.Sequential(nn.Conv2d(in_channels, 12, 3, padding=1), nn.BatchNorm2d(12),\n"
        "        nn.ReLU(), nn.Conv2d(12, 20, 3, padding=1), nn.ReLU(),\n"
        "        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(20, num_classes))\n")
    spec = ModelSpec(f"{f}:make", in_channels=1, input_size=16)
    model = build_model(spec).eval()
    space = SearchSpace.from_model(model, X, SpaceSpec.for_family(spec.family))
    assert space.names == ("0", "3")
    assert space.group("0").min_channels == 4  # default.yaml: min_keep 0.3 of 12, round_to 1
    pruned = apply_policy(model, Policy.from_dict({"0": 6, "3": 10}), example_input=X)
    assert pruned(X).shape == (4, 10)


def test_space_yaml_errors(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("min_keep: 0.2\nround_too: 4\n")
    with pytest.raises(UserError, match="unknown key 'round_too'"):
        SpaceSpec.load(bad)
    bad.write_text("min_keep: [1\n")
    with pytest.raises(UserError, match="not valid YAML at line"):
        SpaceSpec.load(bad)
    bad.write_text("min_keep: 1.5\n")
    with pytest.raises(UserError, match="min_keep"):
        SpaceSpec.load(bad)
    bad.write_text("round_to: four\n")
    with pytest.raises(UserError, match="'round_to' must be an integer"):
        SpaceSpec.load(bad)
    ok = tmp_path / "ok.yaml"
    ok.write_text("min_keep: 0.5\nignored_layers: ['layer3.*']\n"
                  "overrides:\n  - match: conv1\n    min_keep: 1.0\n")
    model = build_model(ModelSpec("resnet20", in_channels=1, input_size=16))
    space = SearchSpace.from_model(model, X, SpaceSpec.load(ok))
    assert not any(n.startswith("layer3") for n in space.names)
    assert space.group("conv1").min_channels == 16
    assert space.group("layer1.0.conv1").min_channels == 8


def test_space_json_round_trip():
    _, space = _space("mobilenetv2")
    again = SearchSpace.from_dict(json.loads(json.dumps(space.to_dict())))
    assert again == space
