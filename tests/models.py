"""Small models that each exercise one channel-coupling pattern."""
from __future__ import annotations

import torch
from torch import nn


def cbr(cin: int, cout: int, k: int = 3, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class Head(nn.Module):
    def __init__(self, c: int, classes: int = 10) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(x), 1))


class Residual(nn.Module):
    """Two residual blocks: the stem and both block outputs are one coupled group."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 32)
        self.b1 = nn.Sequential(cbr(32, 48), nn.Conv2d(48, 32, 3, padding=1), nn.BatchNorm2d(32))
        self.b2 = nn.Sequential(cbr(32, 48), nn.Conv2d(48, 32, 3, padding=1), nn.BatchNorm2d(32))
        self.head = Head(32)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.b1(x))
        x = x + self.b2(x)
        return self.head(torch.relu(x))


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc2(relu(fc1(mean(x))))): x's producer and fc2 are coupled."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = cbr(3, 32)
        self.fc1 = nn.Conv2d(32, 8, 1)
        self.fc2 = nn.Conv2d(8, 32, 1)
        self.head = Head(32)

    def forward(self, x):
        x = self.conv(x)
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return self.head(x * s)


class ConcatNet(nn.Module):
    """Branches concatenated on channels, then BN + conv over the concat (offsets matter)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.a = nn.Conv2d(16, 24, 1)
        self.b = nn.Conv2d(16, 40, 3, padding=1)
        self.bn = nn.BatchNorm2d(80)
        self.mix = cbr(80, 32)
        self.head = Head(32)

    def forward(self, x):
        x = self.stem(x)
        y = torch.cat([self.a(x), x, self.b(x)], dim=1)  # 24 + 16 + 40
        return self.head(self.mix(torch.relu(self.bn(y))))


class DepthwiseGrouped(nn.Module):
    """Depthwise conv passes channels through; a grouped conv needs even removal per group."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = cbr(3, 32, 1)
        self.dw = cbr(32, 32, 3, groups=32)
        self.grouped = cbr(32, 64, 3, groups=4)
        self.project = nn.Conv2d(64, 24, 1)
        self.head = Head(24)

    def forward(self, x):
        return self.head(self.project(self.grouped(self.dw(self.expand(x)))))


class FlattenLinear(nn.Module):
    """Flatten a 4x4 map into a Linear: each channel owns 16 consecutive features; chunk(2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = cbr(3, 16)
        self.pair = nn.Conv2d(16, 32, 3, padding=1)
        self.left = nn.Conv2d(16, 8, 1)
        self.right = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.conv(x), 4)
        a, b = self.pair(x).chunk(2, dim=1)
        x = self.left(torch.relu(a)) + self.right(b)
        return self.fc(torch.cat([x, x], 1).flatten(1))


class Shuffle(nn.Module):
    """Channel shuffle (view + transpose + view) must block, not crash."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = cbr(3, 32)
        self.after = cbr(32, 32)
        self.head = Head(32)

    def forward(self, x):
        x = self.conv(x)
        n, c, h, w = x.shape
        x = x.view(n, 4, c // 4, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(self.after(x))


class ControlFlow(nn.Module):
    """Data-dependent Python control flow; the branch decision reads only the input."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 32)
        self.deep = nn.ModuleList(cbr(32, 32) for _ in range(3))
        self.head = Head(32)

    def forward(self, x):
        depth = 3 if float(x.abs().mean()) > 0 else 1  # decided at run time, from the input
        x = self.stem(x)
        for block in self.deep[:depth]:
            x = x + block(x) if x.shape[-1] > 4 else block(x)
        return self.head(x)


class TokenMLP(nn.Module):
    """Transformer-style [N, T, C] tensors: LayerNorm blocks the stream, the MLP hidden dim prunes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(12, 32)
        self.norm = nn.LayerNorm(32)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.out = nn.Linear(32, 5)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))
        return self.out(x[:, 0])


ALL = {"residual": Residual, "se": SqueezeExcite, "concat": ConcatNet, "dw_grouped": DepthwiseGrouped,
       "flatten_linear": FlattenLinear, "shuffle": Shuffle, "control_flow": ControlFlow,
       "token_mlp": TokenMLP}
INPUTS = {"token_mlp": (2, 7, 12)}


def example_input(name: str, batch: int = 2) -> torch.Tensor:
    shape = INPUTS.get(name, (batch, 3, 16, 16))
    return torch.randn(batch, *shape[1:])


@torch.no_grad()
def randomize_vectors(model: nn.Module, seed: int = 1) -> nn.Module:
    """Make every per-channel tensor and every all-zero weight matter before an equivalence check.

    Random-init BatchNorms are identities in eval mode, timm starts layer scales at 1e-6 and
    some heads at zero: a pruning error would then hide behind them. Vectors (tensors with at
    most one dim larger than 1: BN statistics, gammas, gains, biases) get values of order one
    (variances positive); all-zero weights get small random values. Integer buffers are left.
    """
    g = torch.Generator().manual_seed(seed)
    tensors = [(n, t) for n, t in model.named_parameters()] + [(n, t) for n, t in model.named_buffers()]
    for name, t in tensors:
        if not t.is_floating_point() or t.numel() == 0:
            continue
        leaf = name.rpartition(".")[2]
        vector = sum(1 for s in t.shape if s > 1) <= 1
        if vector:
            r = torch.rand(t.shape, generator=g, dtype=torch.float64)
            if "var" in leaf:
                t.copy_(r + 0.5)
            elif leaf in ("bias", "beta") or "mean" in leaf:
                t.copy_(r - 0.5)
            else:
                t.copy_(r + 0.5)
        elif not t.any():
            t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64) * 0.05)
    return model
