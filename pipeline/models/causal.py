"""Small causal transformers (nanoGPT's design) for token-level distillation.

A causal language model fits the registry's contract with ``num_classes`` = the vocabulary V
and ``input_shape`` = (L,), the longest context: it maps token ids (B, L') with L' <= L to
next-token logits (B, L', V), position p seeing tokens 0..p only. Three sizes are registered
(`gpt_nano`, `gpt_micro`, `gpt_mini`); `causal_transformer` takes any other.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.models import register_model


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then an MLP, each residual."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, W)
        b, length, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(w, dim=2)
        shape = (b, length, self.heads, w // self.heads)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)  # (B, H, L, D)
        x = x + self.proj(y.transpose(1, 2).reshape(b, length, w))
        return x + self.mlp(self.norm2(x))


class CausalTransformer(nn.Module):
    """Token and position embeddings, `layers` blocks, a final norm and the vocabulary head
    (tied to the token embedding, as in GPT-2)."""

    def __init__(self, vocab: int, context: int, layers: int, heads: int, width: int,
                 dropout: float = 0.0):  # fmt: skip
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.context = context
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tokens.weight
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual outputs
            if name.endswith(("proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, L, V) of token ids (B, L), L <= the context."""
        length = tokens.shape[1]
        if length > self.context:
            raise ValueError(f"sequences of {length} tokens, the context is {self.context}")
        pos = torch.arange(length, device=tokens.device)
        x = self.tokens(tokens.long()) + self.positions(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


@register_model(tokens=True)
def causal_transformer(
    num_classes: int,
    input_shape: tuple[int, ...],
    layers: int = 2,
    heads: int = 4,
    width: int = 64,
    dropout: float = 0.0,
) -> nn.Module:
    """Any size: `layers`, `heads` and `width` as kwargs (2, 4, 64 by default).

    Over a vocabulary of `num_classes` and a context of `input_shape[0]` tokens."""
    if len(input_shape) != 1:
        raise ValueError(f"a causal model takes token sequences (L,), not {input_shape}")
    return CausalTransformer(num_classes, input_shape[0], layers, heads, width, dropout)


@register_model(tokens=True)
def gpt_nano(num_classes: int, input_shape: tuple[int, ...], dropout: float = 0.0) -> nn.Module:
    """1 layer, 2 heads, width 32."""
    return causal_transformer(num_classes, input_shape, 1, 2, 32, dropout)


@register_model(tokens=True)
def gpt_micro(num_classes: int, input_shape: tuple[int, ...], dropout: float = 0.0) -> nn.Module:
    """2 layers, 4 heads, width 64."""
    return causal_transformer(num_classes, input_shape, 2, 4, 64, dropout)


@register_model(tokens=True)
def gpt_mini(num_classes: int, input_shape: tuple[int, ...], dropout: float = 0.0) -> nn.Module:
    """4 layers, 4 heads, width 128."""
    return causal_transformer(num_classes, input_shape, 4, 4, 128, dropout)
