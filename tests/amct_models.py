"""Models of AMCT's own test suite, written here from what those tests describe.

Each class names the AMCT test (``hicann/amct``, ``tests/amct_pytorch/testcase_python/``) that uses
a model of that shape and what AMCT expects from it. Module names (``layer1.0``, ``fc.2``...) are
kept, because AMCT's configs and record files refer to layers by those names.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn(cin: int, cout: int, groups: int = 1, bias: bool = True, relu: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel_size=3, groups=groups, bias=bias), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class Net001(nn.Module):
    """conv+BN, depthwise conv+BN, group conv+BN, then three Linear+BN1d; input (N, 2, 28, 28).

    ``configuration/test_retrain_config.py`` uses the variant with ``two_outputs=True`` (a 1x1
    average pool between the depthwise and group convs, and the pooled group-conv output as a
    second model output); ``single_file/test_prune_interface.py`` and ``test_selective_prune.py``
    use the plain classifier.
    """

    def __init__(self, two_outputs: bool = False) -> None:
        super().__init__()
        self.two_outputs = two_outputs
        self.layer1 = _conv_bn(2, 16, bias=False)
        self.layer2 = _conv_bn(16, 16, relu=True)
        self.layer3 = _conv_bn(16, 16, groups=16)
        self.layer4 = _conv_bn(16, 16, groups=16, relu=True)
        self.layer5 = _conv_bn(16, 32, groups=4)
        self.layer6 = _conv_bn(32, 8, groups=8, relu=True)
        self.avg_pool = nn.AvgPool2d(kernel_size=1, stride=1)
        self.global_avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(8 * 16 * 16, 1024), nn.BatchNorm1d(1024),
                                nn.Linear(1024, 128, bias=False), nn.BatchNorm1d(128),
                                nn.ReLU(inplace=True), nn.Linear(128, 10))

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.two_outputs:
            x = self.avg_pool(x)
        x = self.layer6(self.layer5(x))
        logits = F.log_softmax(self.fc(torch.flatten(x, 1)), dim=1)
        return (logits, self.global_avg_pool(x)) if self.two_outputs else logits


class SingleConv(nn.Module):
    """Conv(16->64)+BN, Conv(64->48)+BN; ``prune/test_filter_prune_helper.py::test_cascade``:
    producer ``layer1.0``, consumers ``layer1.1`` and ``layer2.0``."""

    def __init__(self) -> None:
        super().__init__()
        self.layer1 = _conv_bn(16, 64)
        self.layer2 = _conv_bn(64, 48)

    def forward(self, x):
        return self.layer2(self.layer1(x))


class EltwiseConv(nn.Module):
    """Four grouped convs (16->160, groups 2) joined by residual adds, read by two grouped convs.

    ``test_filter_prune_helper.py::test_eltwise`` (one group: the four producers, their BNs, the
    three Adds, ``layer5.0``/``layer6.0``); ``test_prune_interface.py::test_prune_model_002``
    (ratio 0.25, not ascend-optimized: ``layer1.0`` keeps 120 channels).
    """

    def __init__(self) -> None:
        super().__init__()
        for i in range(1, 5):
            setattr(self, f"layer{i}", _conv_bn(16, 160, groups=2))
        self.layer5 = _conv_bn(160, 80, groups=2)
        self.layer6 = _conv_bn(160, 80, groups=2)

    def forward(self, x):
        x12 = self.layer1(x) + self.layer2(x)
        return self.layer5(x12 + self.layer3(x)), self.layer6(x12 + self.layer4(x))


class SplitConcatConv(nn.Module):
    """Conv(16->160) split in two halves, one conv on each half, concatenated into a last conv.

    ``test_filter_prune_helper.py::test_splitconcat``: the split producer is not pruned, the two
    middle convs are, and the last conv's input channels 0..160 / 160..240 follow them. With
    ``grouped_last=True`` (``test_splitconcat_gconv``) the last conv has groups=2, whose groups
    straddle the concat, and nothing is pruned.
    """

    def __init__(self, grouped_last: bool = False) -> None:
        super().__init__()
        self.layer1 = _conv_bn(16, 160)
        self.layer2_1 = _conv_bn(80, 160, groups=2)
        self.layer2_2 = _conv_bn(80, 80, groups=2)
        self.layer3 = _conv_bn(240, 16, groups=2 if grouped_last else 1)

    def forward(self, x):
        a, b = torch.split(self.layer1(x), 80, dim=1)
        return self.layer3(torch.cat([self.layer2_1(a), self.layer2_2(b)], 1))


class NetTrainBranch(nn.Module):
    """``layer1`` feeds ``layer2`` in training mode and ``layer3`` in eval mode.

    AMCT traces in eval mode, so its record (``prune/utils/records/record_NetTrainBranch.txt``)
    lists only ``layer3.0`` as the consumer of ``layer1.0``; applying it breaks the training
    forward, which reads ``layer1`` through ``layer2``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.layer1 = _conv_bn(2, 16, bias=False)
        self.layer2 = _conv_bn(16, 16, relu=True)
        self.layer3 = _conv_bn(16, 16, relu=True)

    def forward(self, x):
        x = self.layer1(x)
        return self.layer2(x) if self.training else self.layer3(x)


class LinearIn2(nn.Module):
    """Linear(16->1024)+BN1d, Linear(1024->128)+BN1d, ReLU, Linear(128->10) on (N, 16).
    ``test_prune_model_003`` (ratio 0.5): layer1 keeps 512, layer3 keeps 128."""

    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Linear(16, 1024)
        self.layer2 = nn.BatchNorm1d(1024)
        self.layer3 = nn.Linear(1024, 128, bias=False)
        self.layer4 = nn.BatchNorm1d(128)
        self.layer5 = nn.ReLU(inplace=True)
        self.layer6 = nn.Linear(128, 10)

    def forward(self, x):
        return self.layer6(self.layer5(self.layer4(self.layer3(self.layer2(self.layer1(x))))))


class LinearIn3(LinearIn2):
    """The same Linear stack on (N, 16, 16): features on the last axis, BatchNorm1d(16) on axis
    1 (the 16 rows). ``test_prune_model_004``: nothing is pruned (1024 and 128 stay)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer2 = nn.BatchNorm1d(16)
        self.layer4 = nn.BatchNorm1d(16)


class LinearIn4(LinearIn2):
    """The same Linear stack on (N, 3, 16, 16), with BatchNorm2d(3) on axis 1 after each Linear.

    ``test_prune_model_005``: layer1 keeps 512, layer3 keeps 64. This is the model whose
    BatchNorm must not be folded into the Linear (it normalises another axis).
    """

    def __init__(self) -> None:
        super().__init__()
        self.layer2 = nn.BatchNorm2d(3)
        self.layer4 = nn.BatchNorm2d(3)


class Conv2dLinear(nn.Module):
    """Conv(3->160)+BN on (N, 3, 16, 16), then Linear(14->80) on the width axis, BN2d(160), ReLU.
    ``test_prune_model_006``: nothing is pruned (160 and 80 stay); AMCT's selective-prune test
    ``test_prune_model_002`` 2:4-masks both layers."""

    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Conv2d(3, 160, kernel_size=3)
        self.layer2 = nn.BatchNorm2d(160)
        self.layer3 = nn.Linear(14, 80, bias=False)
        self.layer4 = nn.BatchNorm2d(160)
        self.layer5 = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.layer5(self.layer4(self.layer3(self.layer2(self.layer1(x)))))


class LinearConv2d(nn.Module):
    """Linear(16->80) on the width axis of (N, 3, 16, 16), BN2d(3), Conv(3->160)+BN, ReLU.
    ``test_prune_model_007``: nothing is pruned (80 and 160 stay)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Linear(16, 80, bias=False)
        self.layer2 = nn.BatchNorm2d(3)
        self.layer3 = nn.Conv2d(3, 160, kernel_size=3)
        self.layer4 = nn.BatchNorm2d(160)
        self.layer5 = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.layer5(self.layer4(self.layer3(self.layer2(self.layer1(x)))))


class LinearJoinConv2d(nn.Module):
    """Linear(64->64) on the width axis of (N, 32, 64, 64) + BN2d(32), and Conv(32->32)+BN+ReLU,
    joined by an add (``test_prune_model_008``) or a channel concat (``test_prune_model_009``).
    Nothing is pruned (64 and 32 stay)."""

    def __init__(self, join: str = "add") -> None:
        super().__init__()
        self.join = join
        self.layer1 = nn.Linear(64, 64, bias=False)
        self.layer2 = nn.BatchNorm2d(32)
        self.layer3 = nn.Conv2d(32, 32, kernel_size=3, padding=1)
        self.layer4 = nn.BatchNorm2d(32)
        self.layer5 = nn.ReLU(inplace=True)

    def forward(self, x):
        a = self.layer2(self.layer1(x))
        b = self.layer5(self.layer4(self.layer3(x)))
        return a + b if self.join == "add" else torch.cat([a, b], 1)


class ConcatDim0Conv(nn.Module):
    """Two convs (16->160, one grouped) concatenated on the batch axis into Conv(160->8).
    ``test_prune_model_010``: nothing is pruned (both keep 160)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer1 = _conv_bn(16, 160)
        self.layer2 = _conv_bn(16, 160, groups=2)
        self.layer3 = _conv_bn(160, 8)

    def forward(self, x):
        return self.layer3(torch.cat((self.layer1(x), self.layer2(x))))


class GroupConv(nn.Module):
    """Conv(16->64), Conv(64->64, groups 2), Conv(64->64, groups 32), Conv(64->8), each + BN.
    ``test_prune_model_011`` (ratio 0.5): layer1 and layer2 keep 32 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.layer1 = _conv_bn(16, 64)
        self.layer2 = _conv_bn(64, 64, groups=2)
        self.layer3 = _conv_bn(64, 64, groups=32)
        self.layer4 = _conv_bn(64, 8)

    def forward(self, x):
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class NetConvDeconv(nn.Module):
    """Conv(2->16)+BN, ConvTranspose(16->16)+BN+ReLU, Conv(16->16)+BN+ReLU on (N, 2, 28, 28).
    ``test_prune_model_012`` (ratio 0.25, not ascend-optimized): after create and restore,
    ``layer1.0`` still has 16 output channels and ``layer2.0`` 16 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.layer1 = _conv_bn(2, 16, bias=False)
        self.layer2 = nn.Sequential(nn.ConvTranspose2d(16, 16, kernel_size=3), nn.BatchNorm2d(16),
                                    nn.ReLU(inplace=True))
        self.layer3 = _conv_bn(16, 16, relu=True)

    def forward(self, x):
        return self.layer3(self.layer2(self.layer1(x)))


class ManyLayers(nn.Module):
    """A mix in the spirit of AMCT's ``DefaultNet`` (``test_compressed_model_004``), input
    (N, 6, 32, 32): plain, dilated and grouped convs, a depthwise conv, a replicate-padded conv,
    two convs concatenated on the batch axis, a Linear on the width axis followed by BatchNorm2d
    on axis 1, pooling, and dilated/grouped transposed convs; four outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, dilation=2)
        self.bn2 = nn.BatchNorm2d(6)
        self.conv3 = nn.Conv2d(6, 6, 3, padding=1, groups=2)
        self.conv4 = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.conv5 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv6 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv7 = nn.Conv2d(6, 6, 3, padding=1, padding_mode="replicate")
        self.bn7 = nn.BatchNorm2d(6)
        self.linear1 = nn.Linear(32, 32, bias=False)
        self.bn_lin = nn.BatchNorm2d(6)
        self.linear2 = nn.Linear(32, 32, bias=False)
        self.pool = nn.AvgPool2d(2, 2)
        self.deconv1 = nn.ConvTranspose2d(6, 6, 3, padding=1, dilation=2)
        self.deconv2 = nn.ConvTranspose2d(6, 6, 3, padding=1, groups=2)
        self.deconv3 = nn.ConvTranspose2d(6, 6, 3, padding=1)

    def forward(self, x0):
        x = self.bn1(self.conv1(x0))
        x = self.bn2(self.conv2(x))
        x = self.conv4(self.conv3(x))
        x = torch.cat((self.conv5(x), self.conv6(x)), 0)
        y1 = self.bn7(self.conv7(x))
        y2 = self.linear2(self.bn_lin(self.linear1(x0)))
        y3 = self.pool(self.pool(x0))
        y4 = self.deconv3(self.deconv2(self.deconv1(x0)))
        return y1, y2, y3, y4


class _Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.bn1(self.conv1(x)))


class ResNetNames(nn.Module):
    """A tiny network with the layer names of AMCT's documented examples (``conv1``,
    ``layer1.0.conv1``, ``fc``: a torchvision ResNet's), input (N, 3, 16, 16)."""

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.layer1 = nn.Sequential(_Block(channels))
        self.fc = nn.Linear(channels, 10)

    def forward(self, x):
        x = self.layer1(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))
