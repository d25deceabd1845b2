"""Decide which drafted tokens the target accepts — greedy or sampled, and lossless either way.

The target's token at every verified position (root and nodes) is decided first: its argmax (greedy), or one
independent draw from its distribution after temperature / top-k / top-p, applied exactly as `transformers`
`generate` applies them (sampling). A node is accepted when its token equals the target's token at its parent and
every ancestor was accepted too. Siblings carry distinct tokens, so the accepted nodes form one root-to-node path;
the target's token at the deepest accepted node is the bonus token.

Why sampling is lossless for any tree shape: walk the accepted path from the root. At each node the next output
token is the target's draw y at that node, y ~ p(. | prefix); if a child carries y we move to the child and repeat
with the child's own, independent draw, else y is the bonus token and the step ends. So every emitted token is a
fresh draw from the target's conditional distribution given everything emitted before it — plain sampling from the
target, whatever the tree. Draws at nodes off the path are simply unused.

This is the recursive rejection scheme of multi-draft speculative sampling (SpecInfer) specialised to how our
drafts propose children: deterministically, the draft's top-k tokens without replacement (a point-mass proposal
per child, q = 1). With q = 1, "accept child x with probability p(x)/q(x), else zero x out of p and renormalise,
try the next child, finally sample the bonus from the residual" accepts child x with total probability exactly p(x)
and otherwise yields a draw from p restricted to non-children — the same law as drawing y ~ p once and following
the child equal to y, which is what we compute (in one vectorised draw per position). The acceptance rate is the
target mass on the children, the best any verifier can get from a fixed set of candidates. Stochastic drafts
(children sampled from the draft's q) would need the q-ratio test instead; castspec never drafts that way.
"""

from __future__ import annotations

import math
import operator
import secrets
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


@dataclass(frozen=True)
class SamplingConfig:
    """How the target's next token is chosen: greedy (temperature 0) or sampled like `transformers.generate`."""

    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    seed: int | None = None

    def __post_init__(self) -> None:
        from castspec.errors import CastspecError

        if not (_is_number(self.temperature) and self.temperature >= 0):  # nan compares false: refused too
            raise CastspecError(f"temperature must be a number >= 0 (0: greedy), got {self.temperature}")
        if not (_is_whole(self.top_k) and self.top_k >= 0):
            raise CastspecError(f"top_k must be a whole number >= 0 (0: off), got {self.top_k}")
        if not (_is_number(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise CastspecError(f"top_p must be in (0, 1] (1: off), got {self.top_p}")
        if self.seed is not None and not _is_whole(self.seed):
            raise CastspecError(f"seed must be a whole number or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_whole(value: object) -> bool:
    try:
        operator.index(value)  # int, numpy and 0-d torch integers; not floats or text
    except TypeError:
        return False
    return True


def _is_number(value: object) -> bool:
    try:
        return math.isfinite(value)  # type: ignore[arg-type]
    except TypeError:
        return False


class TokenChooser:
    """Chooses the target's token at each position from its logits, greedily or by seeded sampling."""

    def __init__(self, config: SamplingConfig, device: torch.device | str = "cpu"):
        self.config = config
        self.generator = None
        self.warpers = None
        if not config.greedy:
            from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

            warpers = [TemperatureLogitsWarper(config.temperature)]
            if config.top_k:
                warpers.append(TopKLogitsWarper(int(config.top_k)))  # it accepts a Python int only
            if config.top_p < 1.0:
                warpers.append(TopPLogitsWarper(config.top_p))
            self.warpers = LogitsProcessorList(warpers)  # the same order as `generate`'s sampling warpers
            self.generator = torch.Generator(device=device)
            # No seed: fresh OS entropy. `torch.seed()` would also reseed torch's global generator behind the
            # caller's back, changing every later `torch.rand` of theirs.
            self.generator.manual_seed(config.seed if config.seed is not None else secrets.randbits(63))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The target's sampling distribution for logits [..., V] (for tests and diagnostics)."""
        flat = logits.reshape(-1, logits.shape[-1]).float()
        return torch.softmax(self.warpers(None, flat), dim=-1).view(logits.shape)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Tokens [...] for logits [..., V]: argmax, or one independent draw per position."""
        if self.config.greedy:
            return logits.argmax(dim=-1)
        probs = self.probabilities(logits)
        flat = probs.reshape(-1, probs.shape[-1])
        return torch.multinomial(flat, 1, generator=self.generator).view(probs.shape[:-1])


def verify_greedy(tree: VerifyTree, logits: torch.Tensor) -> Outcome:
    """`logits` [B, 1 + M, V] are the target's logits at the root (slot 0) and at each node."""
    return verify(tree, logits.argmax(dim=-1))


def verify(tree: VerifyTree, target_next: torch.Tensor) -> Outcome:
    """`target_next` [B, 1 + M] is the target's chosen token at the root (slot 0) and after each node."""
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
