"""The models whose update the tables time: GPT-2's parameter shapes and many small tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class GPTShape:
    vocab: int
    ctx: int
    width: int
    layers: int


GPT2_SMALL = GPTShape(vocab=50257, ctx=1024, width=768, layers=12)
GPT_QUICK = GPTShape(vocab=512, ctx=64, width=64, layers=2)


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.Linear(d, 3 * d)
        self.attn_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.fc_proj = nn.Linear(4 * d, d)


class GPTLike(nn.Module):
    """GPT-2's parameter shapes (no forward is needed to time an update)."""

    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        d = shape.width
        self.wte = nn.Embedding(shape.vocab, d)
        self.wpe = nn.Embedding(shape.ctx, d)
        self.h = nn.ModuleList(_Block(d) for _ in range(shape.layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, shape.vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2


class ManySmall(nn.Module):
    """``blocks`` x (LayerNorm(64), Linear(64, 64), Linear(64, 16)): 6 tensors a block."""

    def __init__(self, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 64), nn.Linear(64, 16))
            for _ in range(blocks)
        )


def perturbed(model: nn.Module, seed: int = 1) -> nn.Module:
    """Move the parameters off their initial values so the average and source differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype), alpha=1e-2)
    return model


def numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
