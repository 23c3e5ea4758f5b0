"""The built-in model zoo, written here (torchvision is not usable on this machine).

Every factory has the signature ``factory(num_classes, in_channels, *, input_size=32, **options)``
and adapts to the input: the stem takes ``in_channels``, downsampling stops before the feature
map would shrink below 2x2, and a global average pool feeds the classifier, so 8x8 digits,
28x28 Fashion-MNIST and 32x32 CIFAR all work with the same code.
"""

from __future__ import annotations

from torch import nn


def _stride(size: int, wanted: int) -> tuple[int, int]:
    """Return (stride actually used, feature size after it): never shrink below 2x2."""
    if wanted > 1 and size >= 4:
        return wanted, (size + wanted - 1) // wanted
    return 1, size


class BasicBlock(nn.Module):
    """He et al. basic block. ``shortcut=True`` adds the residual; a 1x1 projection (option B) is
    used whenever the shape changes, so every conv stays structurally prunable."""

    def __init__(self, in_planes: int, planes: int, stride: int, *, shortcut: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.use_shortcut = shortcut
        self.downsample: nn.Module | None = None
        if shortcut and (stride != 1 or in_planes != planes):
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.use_shortcut:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu2(out)


class CifarResNet(nn.Module):
    """CIFAR-style ResNet (6n+2 layers: a 3x3 stem, three stages of n blocks, 16/32/64 wide)."""

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        in_channels: int = 3,
        *,
        input_size: int = 32,
        shortcut: bool = True,
        width: int = 16,
    ):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"`depth` must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        size, in_planes = input_size, width
        stages = []
        for i, planes in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for j in range(n):
                stride = 1
                if i > 0 and j == 0:
                    stride, size = _stride(size, 2)
                blocks.append(BasicBlock(in_planes, planes, stride, shortcut=shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _init(self)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


class InvertedResidual(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int):
        super().__init__()
        hidden = in_planes * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(in_planes, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                       nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_planes, 1, bias=False),
            nn.BatchNorm2d(out_planes),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_planes == out_planes

    def forward(self, x):
        out = self.conv(x)
        # the output first, as the latency table's op modules add it: TVM compiles x + out to
        # another kernel than the one the table timed
        return out + x if self.use_residual else out


# (expansion, out channels, repeats, stride) as in Sandler et al., with the CIFAR change of
# kuangliu/pytorch-cifar: stem stride 1 and the second stage stride 1, for 32x32 inputs.
_MBV2_CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
             (6, 160, 3, 2), (6, 320, 1, 1)]


def _make_divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, *, input_size: int = 32,
                 width_mult: float = 1.0):
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"`width_mult` must be > 0, got {width_mult}")
        stem = _make_divisible(32 * width_mult)
        last = _make_divisible(1280 * max(1.0, width_mult))
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(stem), nn.ReLU6(inplace=True))
        size, in_planes, blocks = input_size, stem, []
        for t, c, n, s in _MBV2_CFG:
            out = _make_divisible(c * width_mult)
            for i in range(n):
                stride = 1
                if i == 0:
                    stride, size = _stride(size, s)
                blocks.append(InvertedResidual(in_planes, out, t, stride))
                in_planes = out
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(in_planes, last, 1, bias=False), nn.BatchNorm2d(last),
                                  nn.ReLU6(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)
        _init(self)

    def forward(self, x):
        x = self.head(self.features(self.stem(x)))
        return self.classifier(self.pool(x).flatten(1))


_VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


class VGG(nn.Module):
    """VGG with BatchNorm; a max-pool is skipped once the map is 2x2 or smaller, so small inputs
    keep working, and a global average pool replaces the fixed-size flatten."""

    def __init__(self, cfg: list, num_classes: int = 10, in_channels: int = 3, *,
                 input_size: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        size, c_in = input_size, in_channels
        for v in cfg:
            if v == "M":
                if size >= 4:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            layers += [nn.Conv2d(c_in, v, 3, 1, 1, bias=False), nn.BatchNorm2d(v),
                       nn.ReLU(inplace=True)]
            c_in = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)
        _init(self)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def _init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def resnet20(num_classes=10, in_channels=3, **kw):
    return CifarResNet(20, num_classes, in_channels, **kw)


def resnet56(num_classes=10, in_channels=3, **kw):
    return CifarResNet(56, num_classes, in_channels, **kw)


def plain20(num_classes=10, in_channels=3, **kw):
    return CifarResNet(20, num_classes, in_channels, shortcut=False, **kw)


def mobilenetv2(num_classes=10, in_channels=3, **kw):
    return MobileNetV2(num_classes, in_channels, **kw)


def vgg11(num_classes=10, in_channels=3, **kw):
    return VGG(_VGG11, num_classes, in_channels, **kw)


# name -> (factory, search-space family)
ZOO = {
    "resnet20": (resnet20, "resnet"),
    "resnet56": (resnet56, "resnet"),
    "plain20": (plain20, "plain"),
    "mobilenetv2": (mobilenetv2, "mobilenetv2"),
    "vgg11": (vgg11, "vgg"),
}
