"""BalancedL2Norm: which channels of a group to remove. Pure functions on tensors."""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
from torch import Tensor

__all__ = ["balanced_l2_scores", "group_scores", "kept_count", "select_removed"]


def balanced_l2_scores(weight: Tensor) -> Tensor:
    """Per output channel (dim 0): L2 norm of its weights / number of weights per channel,
    min-max normalised to [0, 1] within the layer (all zeros if every channel scores the same).

    Shapes: weight ``[C_out, ...]``; returns float64 ``[C_out]``.
    """
    w = weight.detach().double().reshape(weight.shape[0], -1)
    score = w.norm(dim=1) / w.shape[1]
    lo, hi = score.min(), score.max()
    return (score - lo) / (hi - lo) if hi > lo else torch.zeros_like(score)


def group_scores(per_producer: Sequence[Tensor]) -> Tensor:
    """A coupled group ranks its channels by the mean of its producers' normalised scores."""
    return torch.stack([s.double() for s in per_producer]).mean(dim=0)


def kept_count(channels: int, ratio: float, ascend_optimized: bool, parts: int = 1, block: int = 1) -> int:
    """Channels kept: counted in blocks of ``block`` channels (whole attention heads; 1 for
    plain channels), ``n - round(n * ratio)`` of the ``n = C / block`` blocks, rounded up so the
    channels are a multiple of 16 (ascend_optimized) and the blocks a multiple of the number of
    equal parts (grouped convs, chunks); at least one block per part, at most ``C``."""
    n = channels // block
    keep = max(1, n - math.floor(n * ratio + 0.5))
    multiple = parts
    if ascend_optimized:
        per16 = 16 // math.gcd(16, block)  # blocks per multiple of 16 channels
        multiple = parts * per16 // math.gcd(parts, per16)
    keep = math.ceil(keep / multiple) * multiple
    return min(n, max(keep, parts)) * block


def select_removed(scores: Tensor, ratio: float, ascend_optimized: bool, parts: int = 1,
                   block: int = 1) -> List[int]:
    """Indices to remove: in each of ``parts`` equal parts, the lowest-scoring blocks (a block's
    score is the mean of its ``block`` channels'; ties go to the higher index), so that every
    part keeps the same number of blocks. ``block=1`` ranks single channels."""
    channels = scores.numel()
    keep = kept_count(channels, ratio, ascend_optimized, parts, block) // block
    per_part, keep_per_part = channels // block // parts, keep // parts
    unit_scores = scores.double().reshape(-1, block).mean(dim=1)
    removed: List[int] = []
    for p in range(parts):
        base = p * per_part
        # best first; a stable sort keeps equal scores in index order, so ties drop the higher index
        order = torch.sort(-unit_scores[base:base + per_part], stable=True).indices[keep_per_part:].tolist()
        removed.extend(c for i in order for c in range((base + i) * block, (base + i + 1) * block))
    return sorted(removed)
