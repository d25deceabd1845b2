"""EAGLE-2's dynamic tree (Li et al., 2024), as in EAGLE's `topK_genrate`.

Level 1 holds the root's `top_k` most likely children. Each further level expands the `top_k` best nodes of the
previous level by path score; each proposes `top_k` children, and all top_k² candidates are kept for reranking.
There are `depth + 1` levels (EAGLE's loop runs `depth` times after the first level). Finally the `total_tokens - 1`
best nodes by path score are verified together with the root, i.e. `total_tokens` tokens per target forward.
Defaults are those of EAGLE's `EaModel.from_pretrained`.
"""

from __future__ import annotations

import torch

from castspec.errors import CastspecError
from castspec.policies.base import TreePolicy, register, top_nodes_by_score
from castspec.tree import DraftTree


@register
class Eagle2Policy(TreePolicy):
    name = "eagle2"

    def __init__(self, total_tokens: int = 60, depth: int = 7, top_k: int = 10):
        if total_tokens < 2 or depth < 0 or top_k < 1:
            raise CastspecError("eagle2: need total_tokens >= 2, depth >= 0, top_k >= 1")
        self.total_tokens, self.depth, self.top_k = int(total_tokens), int(depth), int(top_k)

    def max_depth(self) -> int:
        return self.depth + 1

    def children_per_node(self, level: int) -> int:
        return self.top_k

    def choose(self, level: int, cand_logscore: torch.Tensor,
               cand_source: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        order = torch.sort(cand_logscore, dim=1, descending=True, stable=True).indices
        return order, min(self.top_k, order.shape[1])

    def select(self, tree: DraftTree) -> torch.Tensor:
        return top_nodes_by_score(tree, self.total_tokens - 1)

    def describe(self) -> dict:
        return {"policy": self.name, "total_tokens": self.total_tokens, "depth": self.depth, "top_k": self.top_k}
