import pytest
import torch
from torch import nn

from autoprune.errors import UserError
from autoprune.models import ModelSpec, build_model, load_state, read_checkpoint, save_checkpoint
from autoprune.models.zoo import ZOO


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("in_channels,size,classes", [(1, 28, 10), (3, 32, 7), (1, 8, 10)])
def test_zoo_adapts_to_input(name, in_channels, size, classes):
    model = build_model(ModelSpec(name, num_classes=classes, in_channels=in_channels,
                                  input_size=size)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, classes)
    assert torch.isfinite(out).all()


def test_resnet_depths_and_projection_shortcuts():
    convs = lambda m: [x for x in m.modules() if isinstance(x, nn.Conv2d)]  # noqa: E731
    r20, r56 = build_model(ModelSpec("resnet20")), build_model(ModelSpec("resnet56"))
    # 6n+2 weighted layers along the main path, plus two 1x1 projection shortcuts.
    assert len(convs(r20)) == 19 + 2 and len(convs(r56)) == 55 + 2
    proj = [m for m in convs(r20) if m.kernel_size == (1, 1)]
    assert [(p.in_channels, p.out_channels, p.stride) for p in proj] == [(16, 32, (2, 2)),
                                                                          (32, 64, (2, 2))]
    plain = build_model(ModelSpec("plain20"))
    assert len(convs(plain)) == 19


def test_mobilenetv2_width_multiplier():
    small = build_model(ModelSpec("mobilenetv2", options={"width_mult": 0.5}))
    full = build_model(ModelSpec("mobilenetv2"))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(small) < 0.6 * n(full)


def test_user_model_from_file(tmp_path):
    f = tmp_path / "mynet.py"
    f.write_text(
        "from torch import nn\n"
        "def make(num_classes, in_channels):\n"
        "    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8),\n"
        "        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))\n")
    spec = ModelSpec(f"{f}:make", num_classes=4, in_channels=1, input_size=8)
    assert spec.is_user_model and spec.family == "default"
    model = build_model(spec)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 4)
    with pytest.raises(UserError, match="factory 'nope' not found"):
        build_model(ModelSpec(f"{f}:nope"))
    with pytest.raises(UserError, match="not found"):
        build_model(ModelSpec(f"{tmp_path}/missing.py:make"))
    with pytest.raises(UserError, match="unknown model 'resnet99'"):
        build_model(ModelSpec("resnet99"))


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    spec = ModelSpec("resnet20", in_channels=1, input_size=8)
    model = build_model(spec)
    path = save_checkpoint(tmp_path / "m.pt", model, model_spec=spec, data_spec="digits",
                           input_shape=(1, 1, 8, 8), metrics={"test_acc": 0.5})
    ckpt = read_checkpoint(path)
    assert ModelSpec.from_dict(ckpt["model"]) == spec
    assert ckpt["data"] == "digits" and ckpt["metrics"] == {"test_acc": 0.5}
    again = build_model(spec)
    load_state(again, ckpt["state_dict"], source=str(path))
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    other = build_model(ModelSpec("resnet56", in_channels=1, input_size=8))
    with pytest.raises(UserError, match="missing: layer1.3.conv1.weight"):
        load_state(other, ckpt["state_dict"], source=str(path))
    # A bare state dict is accepted too.
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    assert read_checkpoint(tmp_path / "bare.pt")["model"] is None
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="unreadable"):
        read_checkpoint(tmp_path / "junk.pt")
