"""The paper's two networks, defined here (no torchvision: it does not import beside this torch).

`UNet` is jakeoung/Unet_pytorch `model.py`, either variant: `Net(useBN=True)` (`batch_norm=True`: conv, BatchNorm,
LeakyReLU(0.1) per convolution; what `sonoscore train` trains) or its default `Net(useBN=False)` (`batch_norm=False`:
conv, ReLU; keys `conv1.0`/`conv1.2`). Same modules, same order, same state_dict keys, so its checkpoints load with
`strict=True` at width 1.0. `VGG19BN` is torchvision's `vgg19_bn` feature stack (same
`features.*` keys) followed by the paper's head: Fc1 -> Fc2 (1024, the feature vector the booster scores) -> 4 logits
(`num_classes=0`: no head, the network cut at Fc2).

Both take float32 NCHW in [0, 1] (uint8 / 255). `width` scales every channel count (at least 1 channel), so the
demo can train small copies of the same architectures on a laptop CPU.
"""
from __future__ import annotations

import torch
from torch import nn

UNET_CHANNELS = (32, 64, 128, 256, 512)
# torchvision `cfgs["E"]`: numbers are 3x3 conv widths, "M" a 2x2 max-pool.
VGG19_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


def scaled(channels: int, width: float) -> int:
    """A channel count times the width multiplier, never below one channel."""
    return max(1, int(round(channels * width)))


def _conv_stage(c_in: int, c_out: int, batch_norm: bool = True) -> nn.Sequential:
    """As the reference `add_conv_stage`: with BatchNorm two (3x3 conv + BN + LeakyReLU(0.1)), indices 0/1/2 and
    3/4/5; without, two (3x3 conv + ReLU), indices 0/1 and 2/3."""
    if not batch_norm:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, 1, 1, bias=True), nn.ReLU(),
                             nn.Conv2d(c_out, c_out, 3, 1, 1, bias=True), nn.ReLU())
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, 1, 1, bias=True), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.1),
        nn.Conv2d(c_out, c_out, 3, 1, 1, bias=True), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.1),
    )


def _upsample(c_coarse: int, c_fine: int) -> nn.Sequential:
    """ConvTranspose 4/2/1 (no bias) + ReLU: doubles the side; plain ReLU here, as in the reference."""
    return nn.Sequential(nn.ConvTranspose2d(c_coarse, c_fine, 4, 2, 1, bias=False), nn.ReLU())


# The manifest's `networks.unet.architecture` for each variant.
UNET_ARCHITECTURES = {True: "unet-jakeoung-bn-leakyrelu", False: "unet-jakeoung-relu"}


class UNet(nn.Module):
    """jakeoung/Unet_pytorch UNet: [N,1,H,W] -> sigmoid mask [N,1,H,W]. `batch_norm=True` is its `--useBN` variant
    (BatchNorm + LeakyReLU(0.1)), `batch_norm=False` its default one (ReLU, no BatchNorm).

    H and W must be multiples of 16 (four 2x2 pools); 224 = 16 * 14 needs no padding.
    """

    def __init__(self, width: float = 1.0, batch_norm: bool = True):
        super().__init__()
        self.width = float(width)
        self.batch_norm = bool(batch_norm)
        c1, c2, c3, c4, c5 = (scaled(c, width) for c in UNET_CHANNELS)
        bn = self.batch_norm
        # Registration order matches the reference, so state_dict keys come out in the same order.
        self.conv1 = _conv_stage(1, c1, bn)
        self.conv2 = _conv_stage(c1, c2, bn)
        self.conv3 = _conv_stage(c2, c3, bn)
        self.conv4 = _conv_stage(c3, c4, bn)
        self.conv5 = _conv_stage(c4, c5, bn)
        self.conv4m = _conv_stage(2 * c4, c4, bn)
        self.conv3m = _conv_stage(2 * c3, c3, bn)
        self.conv2m = _conv_stage(2 * c2, c2, bn)
        self.conv1m = _conv_stage(2 * c1, c1, bn)
        self.conv0 = nn.Sequential(nn.Conv2d(c1, 1, 3, 1, 1), nn.Sigmoid())
        self.max_pool = nn.MaxPool2d(2)
        self.upsample54 = _upsample(c5, c4)
        self.upsample43 = _upsample(c4, c3)
        self.upsample32 = _upsample(c3, c2)
        self.upsample21 = _upsample(c2, c1)
        for m in self.modules():  # the reference zeroes conv biases; weights keep torch's default init
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def architecture(self) -> str:
        """The manifest's name for this variant."""
        return UNET_ARCHITECTURES[self.batch_norm]

    @classmethod
    def for_architecture(cls, architecture: str | None, width: float = 1.0) -> "UNet":
        """The UNet a manifest's `networks.unet.architecture` names (the BatchNorm variant when it names none)."""
        for batch_norm, name in UNET_ARCHITECTURES.items():
            if architecture in (None, name):
                return cls(width, batch_norm=batch_norm)
        raise ValueError(f"unknown UNet architecture {architecture!r}; known: {', '.join(UNET_ARCHITECTURES.values())}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.conv1(x)
        e2 = self.conv2(self.max_pool(e1))
        e3 = self.conv3(self.max_pool(e2))
        e4 = self.conv4(self.max_pool(e3))
        e5 = self.conv5(self.max_pool(e4))
        d4 = self.conv4m(torch.cat((self.upsample54(e5), e4), 1))
        d3 = self.conv3m(torch.cat((self.upsample43(d4), e3), 1))
        d2 = self.conv2m(torch.cat((self.upsample32(d3), e2), 1))
        d1 = self.conv1m(torch.cat((self.upsample21(d2), e1), 1))
        return self.conv0(d1)


def vgg19_bn_features(width: float = 1.0, in_channels: int = 3) -> nn.Sequential:
    """torchvision `make_layers(cfgs["E"], batch_norm=True)`: conv, BN, ReLU(inplace) per number; pool per "M"."""
    layers: list[nn.Module] = []
    c_in = in_channels
    for v in VGG19_CONFIG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            c_out = scaled(v, width)
            layers += [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
    return nn.Sequential(*layers)


class VGG19BN(nn.Module):
    """VGG-19-BN features -> 7x7 -> flatten -> Fc1 -> Fc2 (features_dim, the booster's input) -> `num_classes` logits.

    `forward` returns logits (what cross-entropy trains); `forward_features` the ReLU'd Fc2 output. With
    `num_classes=0` the network is cut at Fc2: no head, and `forward` returns the features.
    """

    def __init__(self, width: float = 1.0, in_channels: int = 3, num_classes: int = 4, fc1: int | None = None,
                 features_dim: int = 1024):
        super().__init__()
        self.width = float(width)
        self.in_channels = int(in_channels)
        self.features_dim = int(features_dim)
        self.features = vgg19_bn_features(width, in_channels)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        fc1 = fc1 or scaled(4096, width)
        self.fc1 = nn.Linear(scaled(512, width) * 7 * 7, fc1)
        self.fc2 = nn.Linear(fc1, features_dim)
        self.head = nn.Linear(features_dim, num_classes) if num_classes else None
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(0.5)
        self._init_weights()

    def _init_weights(self) -> None:
        """torchvision's VGG init: Kaiming-normal convs, unit BN, N(0, 0.01) linears, zero biases."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if x.shape[-2:] != (7, 7):  # at 224x224 the stack already ends at 7x7: no pooling op in the graph
            x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.dropout(self.relu(self.fc1(x)))
        return self.relu(self.fc2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.forward_features(x)
        return features if self.head is None else self.head(self.dropout(features))


class VGGFeaturesAndLogits(nn.Module):
    """The exported form of a `VGG19BN`: one pass, two outputs (Fc2 features for the booster, and the logits); one
    output, the features, for a VGG cut at Fc2."""

    def __init__(self, vgg: VGG19BN):
        super().__init__()
        self.vgg = vgg
        self.train(vgg.training)  # a new module starts in training mode; take the wrapped model's mode instead

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.vgg.forward_features(x)
        if self.vgg.head is None:
            return (features,)
        return features, self.vgg.head(features)  # dropout is identity in eval mode
