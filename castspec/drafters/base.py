"""The interface every drafter implements: it proposes children for frontier nodes of the step's tree.

The engine owns the one decode loop; a drafter only proposes. Per step the engine asks for the root's children
(`start`), then for the children of each frontier the policy chose to expand (`expand`), and after verification
tells the drafter what was accepted (`finish_step`). Rows join (`add_rows`) and leave (`keep_rows`) between steps.

Proposals are the k best children of each frontier node, [B, F, k]: their tokens, their log-scores given the
parent (a draft LM's log-probabilities, or a draft-free source's log of an empirical frequency) and their *source*.
Scores of different sources mean different things (an LM's 0.9 and a repeat seen 9 times out of 10 are not accepted
equally often), so a policy that predicts acceptance calibrates each source on its own (`SOURCE_*` below). A drafter
that has fewer than k children for a node pads with `NO_TOKEN` at `NO_SCORE`: such a node can be verified (at a cost)
but never accepted, since no target token equals it. `free` drafters cost no model forward, so a policy should count
no drafting time for them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch

from castspec.tree import DraftTree
from castspec.verify import Outcome

NO_TOKEN = -1  # a padding proposal: never equal to a target token, fed to models as token 0
NO_SCORE = -1.0e4  # its log-score: finite (no NaN in differences), exp() is 0

# Where a proposal came from; a policy calibrates acceptance per source. Draft-free acceptance depends on how long
# the matched context was (a long repeat continues more reliably), so each match-length band is its own source.
SOURCE_LM = 0  # a draft model's top-k
SUFFIX_MATCH_BANDS = (1, 2, 4, 8)  # suffix proposals from a match of >= 1, >= 2, >= 4, >= 8 tokens: sources 1 .. 4
SOURCE_BOTH = 1 + len(SUFFIX_MATCH_BANDS)  # proposed by the draft model and by the text's repeats alike
NUM_SOURCES = SOURCE_BOTH + 1


def suffix_source(match_len: int) -> int:
    """The source code of a suffix proposal found by a match of `match_len` tokens (>= 1)."""
    return sum(match_len >= band for band in SUFFIX_MATCH_BANDS)


class Proposals(NamedTuple):
    """Children proposed for frontier nodes, each [B, F, k]."""

    scores: torch.Tensor  # log-score given the parent (float)
    tokens: torch.Tensor  # token ids (long), NO_TOKEN for padding
    source: torch.Tensor  # SOURCE_* code (long)

    @classmethod
    def from_lm(cls, scores: torch.Tensor, tokens: torch.Tensor) -> Proposals:
        return cls(scores, tokens, torch.full_like(tokens, SOURCE_LM))


class Drafter(ABC):
    """Proposes the children of frontier nodes; keeps whatever per-row state it needs between steps."""

    free: bool = False  # True: proposing costs no model forward (the policy then counts no drafting time)

    @abstractmethod
    def add_rows(self, prompts: list[list[int]], first_token: torch.Tensor, budget: int = 0,
                 fresh: bool = False) -> None:
        """New sequences join after the live ones (`fresh`: there are none); `first_token` [n] is each one's first
        output token (not yet verified context for the next step)."""

    @abstractmethod
    def keep_rows(self, rows: list[int]) -> None:
        """Only these rows (ascending indices) stay."""

    def between_steps(self) -> None:  # noqa: B027 (optional hook)
        """Called before each step, outside its timed draft and verify phases (the engine counts it as prefill):
        a drafter may load or prefill what it needs here (see `castspec.drafters.lazy`)."""

    @abstractmethod
    def start(self, k: int) -> Proposals:
        """The root's k best children, [B, 1, k]."""

    @abstractmethod
    def expand(self, tree: DraftTree, frontier: torch.Tensor, k: int) -> Proposals:
        """The k best children of frontier nodes [B, F], [B, F, k]."""

    @abstractmethod
    def finish_step(self, tree: DraftTree, nodes: torch.Tensor, outcome: Outcome) -> None:
        """After verification: `outcome` holds each row's accepted tokens and the bonus token; `nodes` [B, M] maps
        verify positions to tree nodes."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """How many distinct tokens it may propose as children of one node (bounds a policy's k)."""
