"""Plain autoregressive decoding: the baseline, run through the same loop (an empty tree every step)."""

from __future__ import annotations

import torch

from castspec.policies.base import TreePolicy, register


@register
class AutoregressivePolicy(TreePolicy):
    name = "ar"
    uses_draft = False

    def max_depth(self) -> int:
        return 0

    def children_per_node(self, level: int) -> int:
        return 1

    def choose(self, level: int, cand_logscore: torch.Tensor,
               cand_source: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        return cand_logscore[:, :0].long(), 0
