"""A draft model bought only once it has earned its prefill (issue 15: draft prefill that pays for itself).

Every request that speculates with a draft model first runs the draft over its whole prompt. On long prompts with
short answers (RAG, summaries) that prefill costs more than speculation then saves. `LazyDraft` starts each batch
with the free suffix drafter (repeats of the prompt and output, no model) and prefills the draft model only when the
batch has earned it, by the ski-rental rule: it adds up the time of the steps in which the text alone proposed
nothing the target accepted (where a draft model could have helped), and buys the draft model once that *regret*
reaches its threshold. Plain ski rental sets the threshold to the price, what the draft's prefill over the current
context is predicted to cost (the target's measured prefill per token, times the draft/target cost ratio from the
cost table, times the context). Here the
price is also weighed against the *upside*, what the draft could save over the rest of the answer budget (the
remaining tokens at the measured time of a step, times `DRAFT_SAVES`): when the price is small beside it (short
prompts, long budgets: code, chat) the threshold is price * price / upside, so a few unshortened steps buy the draft;
when the price approaches the upside (long prompts, where answers are also often short: RAG, summaries) it is the
price, as in plain ski rental. (A budget is only an upper bound on the answer, which is why a large upside lowers the
threshold only in proportion to how small the price is beside it.) Copy-heavy answers keep speculating for free;
where the text does not repeat, the draft joins after a few slow steps and proposes alone from then on (merged with
the text's candidates it did worse: the target almost never accepted a repeat the draft did not also propose, README
"Drafting from the text itself"). Lossless like every drafter (the target decides).

The prefill happens between steps (`between_steps`), where the engine counts it as prefill time: a step's draft and
verify times, which CAST learns costs and rates from, never include it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from castspec.draft import DraftLM
from castspec.drafters.base import Drafter, Proposals
from castspec.drafters.suffix import SuffixDrafter
from castspec.tree import DraftTree
from castspec.verify import Outcome

# The share of decode time a draft model saves where the text alone does not help: `cast`'s decode-only speedup over
# plain decoding was 1.4-1.6x on this project's CPU hosts (README), i.e. about a third of the time.
DRAFT_SAVES = 1 / 3


class LazyDraft(Drafter):
    """Suffix drafting first; the draft model takes over (prefilled on each row's whole context) once it pays."""

    def __init__(self, lm: DraftLM, suffix: SuffixDrafter, prefill_ms: Callable[[int, int], float]):
        """`prefill_ms(rows, tokens)`: the predicted time of the draft's prefill over `rows` contexts of at most
        `tokens` tokens each."""
        self.lm, self.suffix = lm, suffix
        self.prefill_ms = prefill_ms
        self.bought = False
        self.regret_ms = 0.0
        self.last_finish: float | None = None
        self.budget = 0
        self.steps, self.steps_ms = 0, 0.0  # timed steps before the purchase

    @property
    def free(self) -> bool:  # type: ignore[override]
        return not self.bought

    @property
    def vocab_size(self) -> int:
        return self.lm.vocab_size

    def add_rows(self, prompts: list[list[int]], first_token: torch.Tensor, budget: int = 0,
                 fresh: bool = False) -> None:
        if fresh:  # a new batch decides afresh; its first step is timed from here (right after the prefill)
            self.bought, self.regret_ms, self.last_finish = False, 0.0, time.perf_counter()
            self.steps, self.steps_ms = 0, 0.0
        self.budget = max(budget, self.budget) if not fresh else budget
        self.suffix.add_rows(prompts, first_token, budget, fresh)
        if self.bought:
            self.lm.add_rows(prompts, first_token, budget, fresh=False)

    def keep_rows(self, rows: list[int]) -> None:
        self.suffix.keep_rows(rows)
        if self.bought:
            self.lm.keep_rows(rows)

    def between_steps(self) -> None:
        """Buy the draft model when the regret has reached its predicted prefill cost."""
        if self.bought or not self.suffix.rows:
            return
        contexts = [index.tokens for index in self.suffix.rows]
        if self.regret_ms < self.threshold_ms(contexts):
            return
        root = torch.tensor([c[-1] for c in contexts], dtype=torch.long, device=self.suffix.device)
        self.lm.prefill([c[:-1] for c in contexts], root, self.budget)  # the root waits as the pending token
        self.bought = True

    def threshold_ms(self, contexts: list[list[int]]) -> float:
        """The regret at which the draft is bought: its price, lowered to price * price / upside when the upside
        over the remaining budget is the larger (module docstring)."""
        price = self.prefill_ms(len(contexts), max(self.lm.prefill_tokens([c[:-1] for c in contexts])))
        if not self.steps:
            return price
        remaining = max(self.budget - (len(c) - start) for c, start in zip(contexts, self.suffix.prompt_lens,
                                                                           strict=True))
        upside = max(remaining, 0) * self.steps_ms / self.steps * DRAFT_SAVES
        return price if upside <= price else price * price / upside

    @property
    def proposer(self) -> Drafter:
        return self.lm if self.bought else self.suffix

    def start(self, k: int) -> Proposals:
        return self.proposer.start(k)

    def expand(self, tree: DraftTree, frontier: torch.Tensor, k: int) -> Proposals:
        return self.proposer.expand(tree, frontier, k)

    def finish_step(self, tree: DraftTree, nodes: torch.Tensor, outcome: Outcome) -> None:
        self.suffix.finish_step(tree, nodes, outcome)  # cheap; keeps its rows aligned with the batch
        if self.bought:
            self.lm.finish_step(tree, nodes, outcome)
            return
        now = time.perf_counter()
        if self.last_finish is not None:
            elapsed = 1000 * (now - self.last_finish)
            self.steps, self.steps_ms = self.steps + 1, self.steps_ms + elapsed
            if not bool((outcome.n_accepted > 0).any()):
                self.regret_ms += elapsed  # a step the text alone could not shorten
        self.last_finish = now
