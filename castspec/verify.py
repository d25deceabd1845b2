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

The randomness of a draw is keyed by the output index it would fill (`TokenChooser`): the nodes of one depth share a
uniform number, nodes of different depths never do. Only one node per depth lies on the accepted path, so the
emitted tokens still see independent uniforms; and a seeded sequence's tokens are then a function of the seed and
the target's logits alone, the same whatever tree a policy verifies and whatever else shares the batch.

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

import hashlib
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
    """Chooses the target's token at each position from its logits, greedily or by seeded sampling.

    A sampled token is drawn by inverting the target's CDF (token-id order) at a uniform number that depends only
    on the seed, the stream (row of a shared-seed call) and the index of the output token it would become. So a
    seeded sequence gets the same tokens whatever tree shapes a policy picks and whatever shares its batch, and each
    output token is still an independent draw from the target's conditional distribution (the uniforms of distinct
    indices are independent; siblings in a tree share one, but at most one node per depth is on the accepted path).
    """

    CHUNK = 1024  # uniforms are made in fixed chunks, each from its own seed: the same values however far it grows

    def __init__(self, config: SamplingConfig, device: torch.device | str = "cpu", stream: int = 0):
        self.config = config
        self.device = torch.device(device)
        self.warpers = None
        self.seed = self.stream = 0
        self._table = torch.zeros(0, dtype=torch.float64, device=self.device)
        self._drawn = 0  # next index for calls that give none
        if not config.greedy:
            from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

            warpers = [TemperatureLogitsWarper(config.temperature)]
            if config.top_k:
                warpers.append(TopKLogitsWarper(int(config.top_k)))  # it accepts a Python int only
            if config.top_p < 1.0:
                warpers.append(TopPLogitsWarper(config.top_p))
            self.warpers = LogitsProcessorList(warpers)  # the same order as `generate`'s sampling warpers
            # No seed: fresh OS entropy. `torch.seed()` would also reseed torch's global generator behind the
            # caller's back, changing every later `torch.rand` of theirs.
            self.seed = int(config.seed) if config.seed is not None else secrets.randbits(63)
            self.stream = int(stream)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The target's sampling distribution for logits [..., V] (for tests and diagnostics)."""
        flat = logits.reshape(-1, logits.shape[-1]).float()
        return torch.softmax(self.warpers(None, flat), dim=-1).view(logits.shape)

    def reserve(self, count: int) -> None:
        """Have uniforms ready for output indices 0 .. count - 1 (the engine calls it when a sequence joins)."""
        if self.config.greedy or count <= self._table.shape[0]:
            return
        chunks = [self._table.cpu()]
        for chunk in range(self._table.shape[0] // self.CHUNK, -(-count // self.CHUNK)):
            digest = hashlib.blake2b(f"{self.seed}:{self.stream}:{chunk}".encode(), digest_size=8).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
            chunks.append(torch.rand(self.CHUNK, dtype=torch.float64, generator=generator))
        self._table = torch.cat(chunks).to(self.device)  # made on the CPU: the same numbers on every device

    def __call__(self, logits: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens [...] for logits [..., V]: argmax, or the draw for output index `index` [...] at each position
        (default: the next indices in order)."""
        if self.config.greedy:
            return logits.argmax(dim=-1)
        if index is None:
            count = logits[..., 0].numel()
            index = torch.arange(self._drawn, self._drawn + count, device=logits.device).view(logits.shape[:-1])
            self._drawn += count
            self.reserve(self._drawn)
        cdf = self.probabilities(logits).double().cumsum(dim=-1)
        u = self._table[index.clamp(0, self._table.shape[0] - 1).to(self._table.device)].to(cdf.device)
        token = torch.searchsorted(cdf, (u * cdf[..., -1])[..., None].contiguous(), right=True)[..., 0]
        return token.clamp(max=logits.shape[-1] - 1)


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
