"""The networks of the Linearity Grafting paper (and a small MLP), sized for any (C, H, W) input."""

from __future__ import annotations

import torch
from torch import nn

from lingraft.models import register
from lingraft.models.layers import Normalize


def _flat_size(layers: nn.Module, in_shape) -> int:
    with torch.no_grad():
        return int(layers(torch.zeros(1, *in_shape)).numel())


@register("mlp", "MLP: 2 hidden layers of 100 ReLUs (fast tests)")
def mlp(in_shape, num_classes, mean, std, hidden=(100, 100)):
    d = 1
    for s in in_shape:
        d *= s
    layers: list[nn.Module] = [Normalize(mean, std), nn.Flatten()]
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    layers.append(nn.Linear(d, num_classes))
    return nn.Sequential(*layers)


@register("fc-8x200", "MLP: 8 hidden layers of 200 ReLUs (LG paper FC)")
def fc_8x200(in_shape, num_classes, mean, std):
    return mlp(in_shape, num_classes, mean, std, hidden=(200,) * 8)


@register("cnn-b", "CNN-B: pad(1,2,1,2), conv 32 5x5 s2, conv 128 4x4 s2, FC 250, FC classes")
def cnn_b(in_shape, num_classes, mean, std):
    c = in_shape[0]
    feats = nn.Sequential(
        Normalize(mean, std),
        nn.ZeroPad2d((1, 2, 1, 2)),
        nn.Conv2d(c, 32, 5, stride=2, padding=0),
        nn.ReLU(),
        nn.Conv2d(32, 128, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
    )
    n = _flat_size(feats, in_shape)
    return nn.Sequential(*feats, nn.Linear(n, 250), nn.ReLU(), nn.Linear(250, num_classes))


@register("convbig", "ConvBig: 4 convs (32,32,64,64), FC 512, FC 512, FC classes")
def convbig(in_shape, num_classes, mean, std):
    c = in_shape[0]
    feats = nn.Sequential(
        Normalize(mean, std),
        nn.Conv2d(c, 32, 3, stride=1, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=1, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
    )
    n = _flat_size(feats, in_shape)
    return nn.Sequential(
        *feats, nn.Linear(n, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, num_classes)
    )


class BasicBlock(nn.Module):
    """Residual block without batch norm: relu(conv(relu(conv(x))) + shortcut(x))."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1)
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride)
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x):
        return self.relu2(self.conv2(self.relu1(self.conv1(x))) + self.shortcut(x))


class ResNet4B(nn.Module):
    """ResNet-4B (beta-CROWN / LG benchmark family): conv 16 s2, 2 residual blocks, FC 100, FC classes."""

    def __init__(self, in_shape, num_classes, mean, std):
        super().__init__()
        c = in_shape[0]
        self.norm = Normalize(mean, std)
        self.conv1 = nn.Conv2d(c, 16, 3, stride=2, padding=1)
        self.relu1 = nn.ReLU()
        self.block1 = BasicBlock(16, 32, stride=2)
        self.block2 = BasicBlock(32, 32, stride=1)
        self.flatten = nn.Flatten()
        with torch.no_grad():
            n = self._features(torch.zeros(1, *in_shape)).numel()
        self.fc1 = nn.Linear(n, 100)
        self.relu_fc = nn.ReLU()
        self.fc2 = nn.Linear(100, num_classes)

    def _features(self, x):
        return self.flatten(self.block2(self.block1(self.relu1(self.conv1(self.norm(x))))))

    def forward(self, x):
        return self.fc2(self.relu_fc(self.fc1(self._features(x))))


@register("resnet-4b", "ResNet-4B: conv 16 s2, residual blocks 32 s2 and 32, FC 100, FC classes")
def resnet_4b(in_shape, num_classes, mean, std):
    return ResNet4B(in_shape, num_classes, mean, std)
