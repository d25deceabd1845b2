"""Decide which drafted tokens the target accepts.

Greedy (temperature 0): a node is accepted when its token equals the target's argmax at its parent and every
ancestor was accepted too. Siblings carry distinct tokens, so the accepted nodes form one root-to-node path; the
target's argmax at the deepest accepted node is the bonus token. The output is therefore exactly what greedy
decoding with the target alone would produce.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from castspec.tree import VerifyTree


@dataclass
class Outcome:
    """What one verification step accepted, per sequence."""

    path: torch.Tensor  # [B, D] positions in the VerifyTree of the accepted nodes, by depth; -1 past n_accepted
    n_accepted: torch.Tensor  # [B] number of accepted draft tokens
    bonus: torch.Tensor  # [B] the target's own token after the accepted path
    new_tokens: torch.Tensor  # [B, D + 1] accepted draft tokens then the bonus; valid up to n_accepted + 1


def verify_greedy(tree: VerifyTree, logits: torch.Tensor) -> Outcome:
    """`logits` [B, 1 + M, V] are the target's logits at the root (slot 0) and at each node."""
    target_next = logits.argmax(dim=-1)  # [B, 1 + M]
    batch, count = tree.tokens.shape
    max_depth = int(tree.depth.max()) if count else 0
    expected = target_next.gather(1, tree.parent_pos + 1)
    correct = tree.tokens == expected
    accepted = ~(tree.ancestors & ~correct[:, None, :]).any(dim=2)  # every ancestor (and itself) correct
    n_accepted = accepted.sum(dim=1)
    deepest = torch.where(accepted, tree.depth, 0).argmax(dim=1) if count else torch.zeros_like(n_accepted)
    last_slot = torch.where(n_accepted > 0, deepest + 1, 0)
    bonus = target_next.gather(1, last_slot[:, None])[:, 0]
    return _outcome(tree, accepted, n_accepted, bonus, max_depth)


def _outcome(tree: VerifyTree, accepted: torch.Tensor, n_accepted: torch.Tensor, bonus: torch.Tensor,
             max_depth: int) -> Outcome:
    batch, count = tree.tokens.shape
    node_pos = torch.arange(count, device=bonus.device).expand(batch, count)
    # Scatter each accepted node to column depth-1; rejected nodes go to a spare last column that is dropped.
    column = torch.where(accepted, tree.depth - 1, max_depth)
    path = torch.full((batch, max_depth + 1), -1, dtype=torch.long, device=bonus.device)
    path.scatter_(1, column, node_pos)
    path = path[:, :max_depth]
    tokens = torch.where(path >= 0, tree.tokens.gather(1, path.clamp(min=0)), 0) if max_depth else path
    new_tokens = torch.cat([tokens, torch.zeros_like(bonus)[:, None]], dim=1)
    new_tokens.scatter_(1, n_accepted[:, None], bonus[:, None])
    return Outcome(path=path, n_accepted=n_accepted, bonus=bonus, new_tokens=new_tokens)
