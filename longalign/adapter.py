"""The T5 -> UNet text adapter of LaVi-Bridge / LongSD (METHOD.md §2).

`TextAdapter` maps T5-large hidden states (B, L, 1024) to the UNet's cross-attention width
(B, L, 768). Its parameter names and config keys are those of the released folders
(`shihaozhao/LaVi-Bridge` `t5_unet/adapter`, LongSD `s28750_adapter`), so
`TextAdapter.from_pretrained(folder)` loads them with no missing or unexpected keys.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class TextAdapter(ModelMixin, ConfigMixin):
    """`x -> LayerNorm [norm1] -> FF1 -> LayerNorm [norm2] -> FF2` (METHOD.md §2, LaVi-Bridge's layout).

    Each FF is diffusers' `FeedForward` with GEGLU (`net.0.proj`: Linear(d, 2*4d)), dropout 0.1
    (`net.1`) and the output Linear (`net.2`: Linear(4d, d_out)).
    Shapes: (B, L, in_dim) -> (B, L, out_dim).
    """

    @register_to_config
    def __init__(self, in_dim: int = 1024, int_dim: int = 896, out_dim: int = 768):
        super().__init__()
        self.norm1 = nn.LayerNorm(in_dim)
        self.ff1 = FeedForward(in_dim, int_dim, mult=4, dropout=0.1, activation_fn="geglu")
        self.norm2 = nn.LayerNorm(int_dim)
        self.ff2 = FeedForward(int_dim, out_dim, mult=4, dropout=0.1, activation_fn="geglu")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.ff1(self.norm1(hidden_states))
        return self.ff2(self.norm2(hidden_states))
