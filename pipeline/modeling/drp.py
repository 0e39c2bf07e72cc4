"""Dynamic Routing Plugin (DRP), Stable-SAM, docs/METHOD.md §2.3.

From one output token of layer 2's self-attention, DRP predicts the mixing weights α = (α1, α2) of the
deformed features (DSP) and the original grid features:

    t_o (B, C) -> Linear(C->h) -> LayerNorm(h) -> GELU -> Linear(h->2) -> softmax -> α (B, 2)

``h`` (``plugin.drp_hidden``), the token (``plugin.drp_token_index``) and the normalisation
(``plugin.drp_norm``: ``softmax`` as in the paper's reading, or ``sigmoid`` = two independent gates) are
[assume] params.

Initialisation [assume]: the last Linear has zero weight and a bias chosen so that α starts at
(``init_alpha1``, 1 - ``init_alpha1``) for every token (default 0.5/0.5, the uninformed middle of the
paper's Table 6 range 0.36-0.61). With DSP's identity init, x' = (α1 + α2)·x_p = x_p at step 0 whatever α
is, so an untrained Stable-SAM is SAM; the zero weight only delays the token dependence by one step.

    python -c "from pipeline.modeling.drp import DynamicRouting as D; print(D(channels=256).num_parameters())"
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

AlphaNorm = Literal["softmax", "sigmoid"]


class DynamicRouting(nn.Module):
    """DRP: output token ``(B, C)`` -> routing weights α ``(B, 2)`` (α1: deformed, α2: original features)."""

    def __init__(
        self,
        *,
        channels: int,
        hidden: int = 16,
        norm: AlphaNorm = "softmax",
        init_alpha1: float = 0.5,
    ) -> None:
        """
        Args:
          channels: C, the token width (256 for SAM).
          hidden: h, the MLP's hidden width (``plugin.drp_hidden``).
          norm: ``softmax`` (α1 + α2 = 1) or ``sigmoid`` (each α in (0, 1)) (``plugin.drp_norm``).
          init_alpha1: α1 at initialisation, in (0, 1) (``plugin.drp_init_alpha1``).
        """
        super().__init__()
        if hidden <= 0:
            raise ValueError(f"hidden must be > 0, got {hidden}")
        if norm not in ("softmax", "sigmoid"):
            raise ValueError(f"norm must be 'softmax' or 'sigmoid', got {norm!r}")
        if not 0.0 < init_alpha1 < 1.0:
            raise ValueError(f"init_alpha1 must be in (0, 1), got {init_alpha1}")
        self.norm = norm
        self.init_alpha1 = float(init_alpha1)
        self.fc1 = nn.Linear(channels, hidden)
        self.ln = nn.LayerNorm(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, 2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero last weight; bias so that α = (init_alpha1, 1 - init_alpha1) for any token."""
        a1 = self.init_alpha1
        if self.norm == "softmax":
            bias = (math.log(a1), math.log(1.0 - a1))
        else:  # sigmoid gates: logit(a1), logit(1 - a1)
            bias = (math.log(a1 / (1.0 - a1)), math.log((1.0 - a1) / a1))
        with torch.no_grad():
            nn.init.zeros_(self.fc2.weight)
            self.fc2.bias.copy_(torch.tensor(bias))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, token: Tensor) -> Tensor:
        """``token (B, C)`` -> α ``(B, 2)``."""
        logits = self.fc2(self.act(self.ln(self.fc1(token))))
        if self.norm == "softmax":
            return torch.softmax(logits, dim=-1)
        return torch.sigmoid(logits)
