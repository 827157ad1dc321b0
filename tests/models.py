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


# ----------------------------------------------------------------------------- layers that
# override forward, written after the patterns of timm's (BatchNormAct2d, LayerScale2d, Affine,
# GlobalResponseNorm, LayerNorm2d, StdConv2d/ScaledStdConv2d, Conv2dSame, Linear, GhostModule)


class BNAct(nn.BatchNorm2d):
    """BatchNorm2d subclass whose forward calls F.batch_norm, then its activation child."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.act = nn.ReLU()

    def forward(self, x):
        x = nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                     self.training, self.momentum, self.eps)
        return self.act(x)


class LayerScale2d(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((c,), 1e-6))

    def forward(self, x):
        return x * self.gamma.view(1, -1, 1, 1)


class TokenAffine(nn.Module):
    """addcmul(beta, alpha, x) on [N, T, C] tokens, parameters of shape [1, 1, C]."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, 1, c))
        self.beta = nn.Parameter(torch.zeros(1, 1, c))

    def forward(self, x):
        return torch.addcmul(self.beta, self.alpha, x)


class ScalarAffine(nn.Module):
    """scale * x + bias with one-element parameters (hgnet's LearnableAffineBlock)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.0]))
        self.bias = nn.Parameter(torch.tensor([0.0]))

    def forward(self, x):
        return self.scale * x + self.bias


class GlobalResponseNorm(nn.Module):
    """Divides by a mean over channels: must block."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x):
        g = x.norm(p=2, dim=(2, 3), keepdim=True)
        n = g / (g.mean(dim=1, keepdim=True) + 1e-6)
        return x + torch.addcmul(self.bias.view(1, -1, 1, 1), self.weight.view(1, -1, 1, 1), x * n)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map: must block."""

    def forward(self, x):
        x = nn.functional.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class GroupNormF(nn.GroupNorm):
    """GroupNorm subclass whose forward calls F.group_norm (one group per channel prunes)."""

    def __init__(self, groups: int, c: int) -> None:
        super().__init__(groups, c)

    def forward(self, x):
        return nn.functional.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class StdConv2d(nn.Conv2d):
    """Weight standardised per output channel over (in, kh, kw), scaled by a per-channel gain."""

    def __init__(self, cin: int, cout: int, k: int = 3, gain: bool = True) -> None:
        super().__init__(cin, cout, k, padding=k // 2)
        if gain:
            self.gain = nn.Parameter(torch.ones(cout, 1, 1, 1))

    def forward(self, x):
        gain = getattr(self, "gain", None)
        w = nn.functional.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                                     weight=(gain * 0.5).view(-1) if gain is not None else None,
                                     training=True, momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ManualStdConv2d(nn.Conv2d):
    """Weight standardisation written with mean/std (the paper's code)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


class ColumnNormConv2d(nn.Conv2d):
    """Normalises its weight across output channels: the outputs must not be pruned."""

    def forward(self, x):
        w = self.weight / (self.weight.norm(dim=0, keepdim=True) + 1e-3)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


class SameConv2d(nn.Conv2d):
    """TensorFlow 'SAME' padding computed from the input size, then F.conv2d on the weight."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 2, groups: int = 1) -> None:
        super().__init__(cin, cout, k, stride=stride, groups=groups)

    def forward(self, x):
        ih, iw = x.size()[-2:]
        kh, kw = self.weight.shape[-2:]
        ph = max((-(-ih // self.stride[0]) - 1) * self.stride[0] + kh - ih, 0)
        pw = max((-(-iw // self.stride[1]) - 1) * self.stride[1] + kw - iw, 0)
        x = nn.functional.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class FLinear(nn.Linear):
    """nn.Linear subclass with its own forward (timm's Linear)."""

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


class GhostModule(nn.Module):
    """cat([x1, cheap(x1)])[:, :out]: a full slice when out is even, a frozen cut when odd."""

    def __init__(self, cin: int, out: int) -> None:
        super().__init__()
        self.out = out
        init = -(-out // 2)
        self.primary = nn.Sequential(nn.Conv2d(cin, init, 1, bias=False), BNAct(init))
        self.cheap = nn.Sequential(nn.Conv2d(init, init, 3, padding=1, groups=init, bias=False), BNAct(init))

    def forward(self, x):
        x1 = self.primary(x)
        return torch.cat([x1, self.cheap(x1)], dim=1)[:, :self.out]


class GhostBottleneck(nn.Module):
    """Two ghost modules and a conv shortcut added to the concat (the shortcut's rows split)."""

    def __init__(self, cin: int, mid: int, out: int) -> None:
        super().__init__()
        self.ghost1 = GhostModule(cin, mid)
        self.ghost2 = GhostModule(mid, out)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, out, 1, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        return self.ghost2(self.ghost1(x)) + self.shortcut(x)


class DualPath(nn.Module):
    """dpn-style x[:, :k] + residual, cat([x[:, k:], dense]): the slice after k stays prunable."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 24)
        self.proj = nn.Conv2d(24, 40, 1)
        self.res = nn.Conv2d(24, 16, 1)
        self.head = Head(16 + 24 + 24)

    def forward(self, x):
        x = self.stem(x)
        y = self.proj(x)
        resid = y[:, :16] + self.res(x)
        dense = torch.cat([y[:, 16:], x], dim=1)
        return self.head(torch.cat([resid, dense], dim=1))


def stem(c: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), BNAct(c))


class TimmLike(nn.Module):
    """One block per pattern; every group ends in a plain conv so none reaches the output."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        c = 16
        self.kind = kind
        self.stem = stem(c)
        blocks = {
            "bnact": lambda: nn.Sequential(nn.Conv2d(c, 24, 1), BNAct(24), nn.Conv2d(24, c, 1)),
            "layer_scale": lambda: nn.Sequential(nn.Conv2d(c, 24, 1), LayerScale2d(24), nn.Conv2d(24, c, 1)),
            "scalar_affine": lambda: nn.Sequential(nn.Conv2d(c, 24, 1), ScalarAffine(), nn.Conv2d(24, c, 1)),
            "group_norm_c": lambda: nn.Sequential(nn.Conv2d(c, 24, 1), GroupNormF(24, 24), nn.Conv2d(24, c, 1)),
            "group_norm_1": lambda: nn.Sequential(nn.Conv2d(c, 24, 1), GroupNormF(1, 24), nn.Conv2d(24, c, 1)),
            "grn": lambda: nn.Sequential(nn.Conv2d(c, 24, 1), GlobalResponseNorm(24), nn.Conv2d(24, c, 1)),
            "layer_norm_2d": lambda: nn.Sequential(nn.Conv2d(c, 24, 1), LayerNorm2d(24), nn.Conv2d(24, c, 1)),
            "std_conv": lambda: nn.Sequential(StdConv2d(c, 24), BNAct(24), nn.Conv2d(24, c, 1)),
            "std_conv_in": lambda: nn.Sequential(nn.Conv2d(c, 24, 1), nn.ReLU(), StdConv2d(24, c, gain=False)),
            "manual_std_conv": lambda: nn.Sequential(ManualStdConv2d(c, 24, 3, padding=1), nn.ReLU(),
                                                     nn.Conv2d(24, c, 1)),
            "column_norm_conv": lambda: nn.Sequential(ColumnNormConv2d(c, 24, 1), nn.Conv2d(24, c, 1)),
            "same_conv": lambda: nn.Sequential(SameConv2d(c, 24), BNAct(24), SameConv2d(24, 24, groups=24),
                                               nn.Conv2d(24, c, 1)),
            "ghost": lambda: GhostBottleneck(c, 24, 32),
            "ghost_odd": lambda: GhostBottleneck(c, 23, 31),
        }
        self.block = blocks[kind]()
        width = {"ghost": 32, "ghost_odd": 31}.get(kind, c)
        self.head = nn.Sequential(nn.Conv2d(width, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), FLinear(8, 5))

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


class TokenAffineMLP(nn.Module):
    """Tokens through FLinear -> TokenAffine -> GELU -> FLinear (resmlp-like, no LayerNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(12, 32)
        self.fc1 = FLinear(32, 48)
        self.affine = TokenAffine(48)
        self.fc2 = FLinear(48, 32)
        self.out = nn.Linear(32, 5)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.fc2(nn.functional.gelu(self.affine(self.fc1(x))))
        return self.out(x.mean(1))


class LinearBN2d(nn.Module):
    """AMCT's test pattern: a Linear over the last axis of a 4-D input, then BatchNorm2d over
    axis 1 (another axis than the Linear's features); it must not be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 6)
        self.bn = nn.BatchNorm2d(32)
        self.conv = nn.Conv2d(32, 8, 3)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn2(self.conv(torch.relu(self.bn(self.fc(x)))))
