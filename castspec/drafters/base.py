"""The interface every drafter implements: it proposes children for frontier nodes of the step's tree.

The engine owns the one decode loop; a drafter only proposes. Per step the engine asks for the root's children
(`start`), then for the children of each frontier the policy chose to expand (`expand`), and after verification
tells the drafter what was accepted (`finish_step`). Rows join (`add_rows`) and leave (`keep_rows`) between steps.

Proposals are the k best children of each frontier node, [B, F, k]: their tokens and their log-scores given the
parent (a draft LM's log-probabilities, or a draft-free source's log of an empirical frequency). A drafter that has
fewer than k children for a node pads with `NO_TOKEN` at `NO_SCORE`: such a node can be verified (at a cost) but never
accepted, since no target token equals it. `free` drafters cost no model forward, so a policy should count no
drafting time for them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from castspec.tree import DraftTree
from castspec.verify import Outcome

NO_TOKEN = -1  # a padding proposal: never equal to a target token, fed to models as token 0
NO_SCORE = -1.0e4  # its log-score: finite (no NaN in differences), exp() is 0


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

    @abstractmethod
    def start(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The root's k best children: log-scores [B, 1, k] and tokens [B, 1, k]."""

    @abstractmethod
    def expand(self, tree: DraftTree, frontier: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best children of frontier nodes [B, F]: log-scores and tokens [B, F, k]."""

    @abstractmethod
    def finish_step(self, tree: DraftTree, nodes: torch.Tensor, outcome: Outcome) -> None:
        """After verification: `outcome` holds each row's accepted tokens and the bonus token; `nodes` [B, M] maps
        verify positions to tree nodes."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """How many distinct tokens it may propose as children of one node (bounds a policy's k)."""
