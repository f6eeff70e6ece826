"""Encoders for modalities of kind "sequence", (B, T, D) -> pooled (B, out_dim), and of kind
"tokens", (B, T) token ids -> pooled (B, out_dim).

Padding convention (data/mosi.py documents the loader's side): a time step whose features are all
zero, or whose token id is 0, is padding. The encoders derive the mask from the values, so the data
item needs no mask channel, and at least one step per sample stays unmasked (a sample with no real
step would otherwise give NaN attention and an empty mean).

  transformer  the default for kinds "sequence" and "tokens": linear projection (sequence) or a
               token embedding (tokens; id 0 embeds to zero) to --transformer_dim, a learnt
               positional embedding, PyTorch's nn.TransformerEncoder (pre-norm, GELU) with the
               padding as key_padding_mask, a final LayerNorm, then the mean over non-padding
               steps. Sequences longer than --transformer_max_len are average-pooled in time
               (padding excluded) before attention (tokens: after the embedding).
  mean_mlp     a cheap alternative: the mean over non-padding steps, then the two-layer MLP of
               encoders.py.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.base import ModalitySpec
from .encoders import MLPEncoder, register_encoder

TRANSFORMER_DEFAULTS = dict(dim=64, layers=2, heads=4, dropout=0.1, max_len=0)


def padding_mask(x: Tensor) -> Tensor:
    """(B, T, D) -> (B, T) bool, True at all-zero steps; the first step of an all-padding sample
    is left unmasked."""
    pad = (x == 0).all(-1)
    pad[:, 0] &= ~pad.all(1)
    return pad


def masked_mean(h: Tensor, pad: Tensor) -> Tensor:
    """Mean of (B, T, C) over the steps where pad (B, T) is False -> (B, C)."""
    keep = (~pad).unsqueeze(-1).to(h.dtype)  # (B, T, 1)
    return (h * keep).sum(1) / keep.sum(1).clamp_min(1.0)


def pool_time(x: Tensor, pad: Tensor, stride: int):
    """Average every `stride` consecutive steps, padding excluded: (B, T, D), (B, T) ->
    (B, ceil(T / stride), D), (B, ceil(T / stride)). A pooled step is padding when all of its
    steps were; pooled padding steps are zero, as the convention wants."""
    b, t, d = x.shape
    n = math.ceil(t / stride)
    extra = n * stride - t
    if extra:
        x = F.pad(x, (0, 0, 0, extra))
        pad = F.pad(pad, (0, extra), value=True)
    keep = (~pad).to(x.dtype).view(b, n, stride, 1)
    count = keep.sum(2)  # (B, n, 1)
    pooled = (x.view(b, n, stride, d) * keep).sum(2) / count.clamp_min(1.0)  # (B, n, stride, D) -> (B, n, D)
    return pooled, count.squeeze(-1) == 0


class TransformerSequenceEncoder(nn.Module):
    """`vocab_size` > 0: the input is (B, T) token ids, embedded (id 0, the padding, to zero);
    otherwise (B, T, in_dim) features, projected."""

    def __init__(self, in_dim: int, seq_len: int, dim: int = 64, layers: int = 2, heads: int = 4,
                 dropout: float = 0.1, max_len: int = 0, vocab_size: int = 0):
        super().__init__()
        self.seq_len = seq_len
        self.stride = math.ceil(seq_len / max_len) if max_len > 0 else 1
        self.out_dim = dim
        self.tokens = vocab_size > 0
        self.proj = nn.Embedding(vocab_size, dim, padding_idx=0) if self.tokens else nn.Linear(in_dim, dim)
        self.pos = nn.Parameter(torch.zeros(1, math.ceil(seq_len / self.stride), dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        # Nested tensors would drop padded positions from the output; we pool with our own mask.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != (2 if self.tokens else 3) or x.shape[1] > self.seq_len:
            want = "(B, T<={}) token ids" if self.tokens else "(B, T<={}, D)"
            raise ValueError(f"transformer encoder built for {want.format(self.seq_len)}, got {tuple(x.shape)}")
        if self.tokens:
            ids = x.long()  # a float batch of ids (e.g. AGM's all-zero input) is cast, not refused
            pad = ids == 0
            pad[:, 0] &= ~pad.all(1)
            x = self.proj(ids)  # (B, T) -> (B, T, dim)
        else:
            pad = padding_mask(x)
        if self.stride > 1:
            x, pad = pool_time(x, pad, self.stride)  # (B, T, D) -> (B, T / stride, D)
        h = x if self.tokens else self.proj(x)  # (B, T, D) -> (B, T, dim)
        h = self.drop(h + self.pos[:, :x.shape[1]])
        h = self.norm(self.encoder(h, src_key_padding_mask=pad))
        return masked_mean(h, pad)  # (B, T, dim) -> (B, dim)


def _check_sequence(spec: ModalitySpec, encoder: str, tokens: bool = False) -> None:
    if (spec.kind == "sequence" and len(spec.shape) == 2) or (tokens and spec.kind == "tokens"):
        return
    want = "a sequence (T, D) or tokens (T,)" if tokens else "a sequence (T, D)"
    raise ValueError(f"encoder {encoder} takes {want}, got modality {spec.name!r} of kind {spec.kind!r} "
                     f"shape {spec.shape}")


def _transformer_args(group: argparse._ArgumentGroup) -> None:
    d = TRANSFORMER_DEFAULTS
    group.add_argument("--transformer_dim", type=int, default=d["dim"],
                       help="transformer encoder: model width, the pooled feature size (default: %(default)s)")
    group.add_argument("--transformer_layers", type=int, default=d["layers"],
                       help="transformer encoder: number of encoder layers (default: %(default)s)")
    group.add_argument("--transformer_heads", type=int, default=d["heads"],
                       help="transformer encoder: attention heads; must divide --transformer_dim "
                            "(default: %(default)s)")
    group.add_argument("--transformer_dropout", type=float, default=d["dropout"],
                       help="transformer encoder: dropout probability in [0, 1) on the input and inside "
                            "every layer (default: %(default)s)")
    group.add_argument("--transformer_max_len", type=int, default=d["max_len"],
                       help="transformer encoder: attend over at most this many time steps; longer "
                            "sequences are average-pooled in time by the smallest integer stride that "
                            "fits; 0 = no limit (default: %(default)s)")


def _transformer_options(args: argparse.Namespace) -> dict:
    return {"dim": args.transformer_dim, "layers": args.transformer_layers, "heads": args.transformer_heads,
            "dropout": args.transformer_dropout, "max_len": args.transformer_max_len}


@register_encoder("transformer", add_args=_transformer_args, options=_transformer_options)
def _transformer(spec: ModalitySpec, dim: int = TRANSFORMER_DEFAULTS["dim"],
                 layers: int = TRANSFORMER_DEFAULTS["layers"], heads: int = TRANSFORMER_DEFAULTS["heads"],
                 dropout: float = TRANSFORMER_DEFAULTS["dropout"],
                 max_len: int = TRANSFORMER_DEFAULTS["max_len"]) -> nn.Module:
    _check_sequence(spec, "transformer", tokens=True)
    rules = [
        (dim >= 1, f"--transformer_dim must be >= 1, got {dim}"),
        (layers >= 1, f"--transformer_layers must be >= 1, got {layers}"),
        (heads >= 1 and dim % heads == 0,
         f"--transformer_heads {heads} must be >= 1 and divide --transformer_dim {dim}"),
        (0.0 <= dropout < 1.0, f"--transformer_dropout must lie in [0, 1), got {dropout}"),
        (max_len >= 0, f"--transformer_max_len must be >= 0 (0 = no limit), got {max_len}"),
    ]
    for ok, message in rules:
        if not ok:
            raise ValueError(message)
    if spec.kind == "tokens":
        return TransformerSequenceEncoder(0, spec.shape[0], dim=dim, layers=layers, heads=heads, dropout=dropout,
                                          max_len=max_len, vocab_size=spec.vocab_size)
    seq_len, in_dim = spec.shape
    return TransformerSequenceEncoder(in_dim, seq_len, dim=dim, layers=layers, heads=heads,
                                      dropout=dropout, max_len=max_len)


class MeanMLPEncoder(nn.Module):
    """Mean over non-padding steps, then a two-layer MLP: (B, T, D) -> (B, D) -> (B, hidden)."""

    def __init__(self, in_dim: int, hidden: int = 256):
        super().__init__()
        self.mlp = MLPEncoder(in_dim, hidden)
        self.out_dim = self.mlp.out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(masked_mean(x, padding_mask(x)))


@register_encoder("mean_mlp")
def _mean_mlp(spec: ModalitySpec) -> nn.Module:
    _check_sequence(spec, "mean_mlp")
    return MeanMLPEncoder(spec.shape[1])
