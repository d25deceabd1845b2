"""A fixed tree shape (EAGLE-1 / Medusa style), given as paths of child ranks.

`paths="0;1;0.0;0.1;1.0;0.0.0"` means: the root's best and second-best children, the best two children of the
best child, the best child of the second, and one level deeper along the best branch. Every prefix of a path must be
a path too. The default is a 14-node tree sized for a CPU, where verifying many nodes is expensive.
"""

from __future__ import annotations

import torch

from castspec.errors import CastspecError
from castspec.policies.base import TreePolicy, register, to_device

DEFAULT_PATHS = "0;1;2;0.0;0.1;1.0;2.0;0.0.0;0.0.1;0.1.0;1.0.0;0.0.0.0;0.0.0.0.0;0.0.0.0.0.0"


@register
class StaticTreePolicy(TreePolicy):
    name = "static"

    def __init__(self, paths: str = DEFAULT_PATHS):
        try:
            nodes = sorted({tuple(int(r) for r in p.split(".")) for p in str(paths).split(";") if p}, key=len)
        except ValueError:
            raise CastspecError(f"static: paths must look like '0;1;0.0', got '{paths}'") from None
        if not nodes or any(r < 0 for n in nodes for r in n):
            raise CastspecError("static: need at least one path of non-negative ranks")
        known = set(nodes)
        if any(n[:-1] and n[:-1] not in known for n in nodes):
            raise CastspecError("static: every prefix of a path must itself be a path")
        self.paths = str(paths)
        self._levels: list[tuple[torch.Tensor, int, int]] = []  # per level: candidate indices (CPU), expand, k
        frontier: list[tuple[int, ...]] = [()]
        for level in range(1, max(len(n) for n in nodes) + 1):
            here = [n for n in nodes if len(n) == level]
            has_children = {n[:-1] for n in nodes if len(n) == level + 1}
            here.sort(key=lambda n: (n not in has_children, frontier.index(n[:-1]), n[-1]))
            k = max(n[-1] for n in here) + 1
            picks = [frontier.index(n[:-1]) * k + n[-1] for n in here]
            expand = sum(n in has_children for n in here)
            self._levels.append((torch.tensor(picks, dtype=torch.long), expand, k))
            frontier = here[:expand]

    def max_depth(self) -> int:
        return len(self._levels)

    def children_per_node(self, level: int) -> int:
        return self._levels[level - 1][2]

    def choose(self, level: int, cand_logscore: torch.Tensor,
               cand_source: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        picks, expand, _ = self._levels[level - 1]
        return to_device(picks, cand_logscore.device).expand(cand_logscore.shape[0], -1), expand

    def describe(self) -> dict:
        return {"policy": self.name, "paths": self.paths}
