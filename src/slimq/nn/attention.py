"""``nn.MultiheadAttention`` with its projections as Linear layers slimq can quantize and prune.

``nn.MultiheadAttention`` keeps the q/k/v projection as one packed parameter (``in_proj_weight``)
that ``F.multi_head_attention_forward`` uses functionally, and calls ``out_proj`` the same way, so
none of the four projections is a layer that runs as a module: AMCT's scheme cannot quantize
them, and an eval fast path (``torch._native_multi_head_attention``, also inside
``nn.TransformerEncoderLayer``) bypasses every module. :class:`SplitMultiheadAttention` computes
the same function with ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` as ordinary Linears,
takes the same arguments and returns the same tuple, and reads ``num_heads``/``head_dim`` on
every call, so removing heads (rows of q/k/v, columns of out_proj) keeps it working.

It also disables the fast paths of the Transformer layers around it (``_qkv_same_embed_dim``
is False and ``in_proj_bias`` is None, which both fast-path checks test), so that eval runs
the modules slimq compressed.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SplitMultiheadAttention", "split_attention"]

log = logging.getLogger("slimq")


def _linear(weight: Tensor, bias: Optional[Tensor]) -> nn.Linear:
    out_f, in_f = weight.shape
    layer = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.weight.requires_grad_(weight.requires_grad)
    return layer


def _additive(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """A bool mask (True = do not attend) as an additive float mask, as MultiheadAttention reads it."""
    if mask is None or mask.is_floating_point():
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


class SplitMultiheadAttention(nn.Module):
    """The function of an ``nn.MultiheadAttention``, with four Linear projections.

    Shapes: as ``nn.MultiheadAttention`` (``batch_first`` respected, unbatched inputs accepted);
    the projections are ``q_proj: E -> H*D``, ``k_proj: kdim -> H*D``, ``v_proj: vdim -> H*D``,
    ``out_proj: H*D -> E`` with ``H = num_heads`` and ``D = head_dim``.
    """

    _qkv_same_embed_dim = False  # MultiheadAttention's packed-weight flag: tells fast paths "no"
    in_proj_weight = None
    in_proj_bias = None

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        e = mha.embed_dim
        self.embed_dim = e
        self.num_heads = mha.num_heads
        self.head_dim = mha.head_dim
        self.batch_first = mha.batch_first
        self.dropout = mha.dropout
        self.kdim, self.vdim = mha.kdim, mha.vdim
        if mha._qkv_same_embed_dim:
            w = mha.in_proj_weight.detach()
            weights = [w[:e], w[e:2 * e], w[2 * e:]]
        else:
            weights = [mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach()]
        b = mha.in_proj_bias.detach() if mha.in_proj_bias is not None else None
        biases = [b[:e], b[e:2 * e], b[2 * e:]] if b is not None else [None] * 3
        self.q_proj = _linear(weights[0], biases[0])
        self.k_proj = _linear(weights[1], biases[1])
        self.v_proj = _linear(weights[2], biases[2])
        self.out_proj = mha.out_proj

    @staticmethod
    def supported(mha: nn.MultiheadAttention) -> Optional[str]:
        """None, or why this attention is left as it is (options the split form does not have)."""
        if mha.bias_k is not None or mha.bias_v is not None:
            return "add_bias_kv=True"
        if mha.add_zero_attn:
            return "add_zero_attn=True"
        return None

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, " \
               f"batch_first={self.batch_first}"

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None,
                average_attn_weights: bool = True, is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # (L, B, E) from here on, as F.multi_head_attention_forward
        tgt, bsz = query.shape[0], query.shape[1]
        src = key.shape[0]
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).reshape(tgt, bsz, h, d).permute(1, 2, 0, 3)
        k = self.k_proj(key).reshape(src, bsz, h, d).permute(1, 2, 0, 3)
        v = self.v_proj(value).reshape(src, bsz, h, d).permute(1, 2, 0, 3)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        mask = self._merged_mask(attn_mask, key_padding_mask, bsz, tgt, src, q.dtype)
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = torch.matmul(q * (d ** -0.5), k.transpose(-2, -1))
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            if p > 0.0:
                weights = F.dropout(weights, p=p)
            out = torch.matmul(weights, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
            weights = None
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(tgt, bsz, h * d))
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None:
            weights = weights.mean(dim=1) if average_attn_weights else weights
            if unbatched:
                weights = weights.squeeze(0)
        return out, weights

    def _merged_mask(self, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], bsz: int,
                     tgt: int, src: int, dtype: torch.dtype) -> Optional[Tensor]:
        """attn_mask (L, S) or (B*H, L, S) and key_padding_mask (B, S) as one additive (B, H, L, S)."""
        attn, pad = _additive(attn_mask, dtype), _additive(key_padding_mask, dtype)
        if attn is not None:
            attn = attn.reshape(1, 1, tgt, src) if attn.dim() == 2 else attn.reshape(bsz, self.num_heads, tgt, src)
        if pad is not None:
            pad = pad.reshape(bsz, 1, 1, src)
        if attn is None:
            return pad
        return attn if pad is None else attn + pad


def split_attention(model: nn.Module) -> List[str]:
    """Replace every supported ``nn.MultiheadAttention`` in ``model`` by its split form, in place.

    Returns the names replaced; the others are logged with the reason (they stay float).
    """
    replaced: List[str] = []
    for parent_name, parent in list(model.named_modules()):
        for key, child in list(parent._modules.items()):
            if type(child) is not nn.MultiheadAttention:
                continue
            name = f"{parent_name}.{key}" if parent_name else key
            why = SplitMultiheadAttention.supported(child)
            if why is not None:
                log.info("slimq: attention '%s' keeps its packed projections (%s): not quantized", name, why)
                continue
            parent._modules[key] = SplitMultiheadAttention(child)
            replaced.append(name)
    if model.__class__ is nn.MultiheadAttention:  # the model itself: nothing holds it to replace
        log.info("slimq: the model is a bare MultiheadAttention; wrap it in a module to compress it")
    return replaced
