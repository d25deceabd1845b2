"""Classic speculative decoding: the draft's greedy chain of `gamma` tokens."""

from __future__ import annotations

import torch

from castspec.errors import CastspecError
from castspec.policies.base import TreePolicy, register


@register
class ChainPolicy(TreePolicy):
    name = "chain"

    def __init__(self, gamma: int = 4):
        if gamma < 1:
            raise CastspecError("chain: gamma must be at least 1")
        self.gamma = int(gamma)

    def max_depth(self) -> int:
        return self.gamma

    def children_per_node(self, level: int) -> int:
        return 1

    def choose(self, level: int, cand_logscore: torch.Tensor,
               cand_source: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        return torch.zeros_like(cand_logscore[:, :1], dtype=torch.long), 1

    def describe(self) -> dict:
        return {"policy": self.name, "gamma": self.gamma}
