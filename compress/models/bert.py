"""`bert-mini`: a BERT-style text encoder (Turc et al. 2019 "mini": 4 layers, 256 hidden,
4 heads, intermediate 1024) with token/position/segment embeddings, post-LN blocks, a
tanh pooler on the first token and a 2-class head. Input: int64 token ids (batch, seq)."""

from __future__ import annotations

import torch
from torch import nn

from compress.models import ModelSpec, register
from compress.models.synthetic import synthetic_tokens
from compress.models.transformer import EncoderBlock


class BertMini(nn.Module):
    def __init__(
        self,
        vocab: int = 30522,
        dim: int = 256,
        depth: int = 4,
        heads: int = 4,
        mlp: int = 1024,
        max_len: int = 512,
        num_classes: int = 2,
    ):
        super().__init__()
        self.word = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(max_len, dim)
        self.segment = nn.Embedding(2, dim)
        self.emb_norm = nn.LayerNorm(dim, eps=1e-12)
        self.blocks = nn.ModuleList([EncoderBlock(dim, heads, mlp, pre_norm=False, eps=1e-12) for _ in range(depth)])
        self.pooler = nn.Linear(dim, dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, input_ids, attention_mask=None):
        t = input_ids.shape[1]
        pos = torch.arange(t, device=input_ids.device)
        x = self.word(input_ids) + self.position(pos)[None] + self.segment(torch.zeros_like(input_ids))
        x = self.emb_norm(x)
        mask = None
        if attention_mask is not None:
            mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for blk in self.blocks:
            x = blk(x, mask)
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


register(
    ModelSpec(
        name="bert-mini",
        build=BertMini,
        example_input=lambda b=1: torch.randint(0, 30522, (b, 128)),
        data=lambda: synthetic_tokens(30522, 32, 2),
        description="BERT-mini (4 layers, 256 hidden, 4 heads, int64 token ids; synthetic marker-count task)",
    )
)
