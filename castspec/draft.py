"""A small causal LM with the target's vocabulary, used to propose the draft tree.

The draft keeps its own KV cache. At each step it first catches up on *pending* tokens — accepted tokens it has
not seen yet, ending with the new root — which gives the distribution of the root's children. Each deeper level
feeds the frontier nodes in one forward, each attending to the prefix and its own ancestors. After verification
it keeps the cache entries of the accepted nodes it did feed; the rest become the next step's pending tokens.

With a `window` the draft is prefilled on each prompt's last `window` tokens only: a long prompt (RAG, summarisation)
then costs the draft a fraction of its prefill, and the draft still sees the recent text its proposals depend on
most. Lossless like everything a draft does (the target decides every token); the draft simply numbers its positions
from the window's start.

A draft may propose from part of the vocabulary only (`castspec.models.draft_head`): its log-probabilities then have
one column per kept token, and `token_ids` maps column indices to token ids.
"""

from __future__ import annotations

import torch

from castspec.drafters.base import Drafter, Proposals
from castspec.models.draft_head import draft_vocab_ids, draft_vocab_size
from castspec.models.runner import CausalLMRunner
from castspec.tree import DraftTree
from castspec.verify import Outcome


class DraftLM(Drafter):
    def __init__(self, runner: CausalLMRunner, window: int = 0):
        self.runner = runner
        self.window = window  # > 0: prefill on each prompt's last `window` tokens only
        self.vocab_ids = draft_vocab_ids(runner.model)  # column -> token id, or None: column j is token j
        self._vocab_size = draft_vocab_size(runner.model)  # columns of the log-probabilities: tokens it can propose

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def token_ids(self, columns: torch.Tensor) -> torch.Tensor:
        """Token ids of columns of `start`'s / `expand`'s log-probabilities (the same tensor for a full head)."""
        return columns if self.vocab_ids is None else self.vocab_ids[columns]

    def seen_part(self, prompts: list[list[int]]) -> list[list[int]]:
        """What of each prompt the draft is prefilled on (all of it, or its last `window` tokens)."""
        return [list(p[-self.window:]) for p in prompts] if self.window > 0 else prompts

    def prefill_tokens(self, prompts: list[list[int]]) -> list[int]:
        """How many tokens of each prompt a prefill would run (the runner reuses a kept prefix for one prompt)."""
        seen = self.seen_part(prompts)
        if len(seen) == 1:
            return [len(seen[0]) - self.runner.reusable(seen[0])]
        return [len(p) for p in seen]

    def prefill(self, prompts: list[list[int]], first_token: torch.Tensor, budget: int = 0) -> None:
        self.runner.prefill(self.seen_part(prompts), budget)
        self.pending = first_token[:, None]
        self.pending_valid = torch.ones_like(self.pending, dtype=torch.bool)
        self.started = False

    def add_rows(self, prompts: list[list[int]], first_token: torch.Tensor, budget: int = 0,
                 fresh: bool = False) -> None:
        """New sequences join after the live ones (between steps): prefill them; their first token waits."""
        if fresh:
            return self.prefill(prompts, first_token, budget)
        self.runner.add_rows(self.seen_part(prompts), budget)
        width = self.pending.shape[1]
        new = torch.zeros(first_token.shape[0], width, dtype=self.pending.dtype, device=self.pending.device)
        new[:, -1] = first_token
        new_valid = torch.zeros_like(new, dtype=torch.bool)
        new_valid[:, -1] = True  # pending tokens sit right-aligned (padding first)
        self.set_pending(torch.cat([self.pending, new]), torch.cat([self.pending_valid, new_valid]))

    def start(self, k: int) -> Proposals:
        """Feed the pending tokens; the root's k likeliest children: log-probabilities and tokens [B, 1, k]."""
        return self.top_children(self.start_logprobs(), k)

    def expand(self, tree: DraftTree, frontier: torch.Tensor, k: int) -> Proposals:
        """Feed the frontier nodes [B, F]; their k likeliest children: log-probabilities and tokens [B, F, k]."""
        return self.top_children(self.expand_logprobs(tree, frontier), k)

    def top_children(self, logprobs: torch.Tensor, k: int) -> Proposals:
        child_logp, child_col = logprobs.topk(k, dim=-1)
        return Proposals.from_lm(child_logp, self.token_ids(child_col))  # the same ids unless the head is reduced

    def start_logprobs(self) -> torch.Tensor:
        """Feed the pending tokens; returns the log-probabilities of the root's children [B, 1, V] (V: `vocab_size`
        columns, see `token_ids`)."""
        runner = self.runner
        runner.begin_block()
        valid = self.pending_valid
        count = valid.shape[1]
        positions = runner.next_pos[:, None] + valid.long().cumsum(dim=1) - 1
        causal = torch.ones(count, count, dtype=torch.bool, device=valid.device).tril()
        block_mask = causal[None] & valid[:, None, :]
        logits = runner.forward(self.pending, positions.clamp(min=0), block_mask, token_valid=valid)
        self.root_pos = runner.next_pos + valid.sum(dim=1) - 1
        self.fed_nodes = torch.zeros(valid.shape[0], 0, dtype=torch.long, device=valid.device)
        self.started = True
        return torch.log_softmax(logits[:, -1:].float(), dim=-1)

    def expand_logprobs(self, tree: DraftTree, frontier: torch.Tensor) -> torch.Tensor:
        """Feed the frontier nodes [B, F]; returns their children's log-probabilities [B, F, V]."""
        runner = self.runner
        batch, width = frontier.shape
        pending = self.pending_valid.shape[1]
        ancestors = tree.ancestors.gather(1, frontier[:, :, None].expand(-1, -1, tree.size))  # [B, F, N]
        sees_fed = ancestors.gather(2, self.fed_nodes[:, None, :].expand(-1, width, -1))
        sees_pending = self.pending_valid[:, None, :].expand(-1, width, -1)
        itself = torch.eye(width, dtype=torch.bool, device=frontier.device).expand(batch, -1, -1)
        block_mask = torch.cat([sees_pending, sees_fed, itself], dim=2)
        positions = self.root_pos[:, None] + tree.depth.gather(1, frontier)
        first_slot = pending + self.fed_nodes.shape[1]
        logits = runner.forward(tree.tokens.gather(1, frontier).clamp(min=0), positions, block_mask)  # no padding id
        slots = torch.arange(first_slot, first_slot + width, device=frontier.device).expand(batch, width)
        tree.draft_slot.scatter_(1, frontier, slots)
        self.fed_nodes = torch.cat([self.fed_nodes, frontier], dim=1)
        return torch.log_softmax(logits.float(), dim=-1)

    def finish_step(self, tree: DraftTree, nodes: torch.Tensor, outcome: Outcome) -> None:
        """After verification: the cache keeps exactly what was fed and accepted, the rest waits as pending.

        Holds for every policy output: a step that never started drafting (plain decoding) only queues the accepted
        tokens; one that started (the pending tokens were fed) commits them even if the tree stayed empty.
        """
        if self.started:
            self.commit(tree, nodes, outcome)
        else:
            count = outcome.new_tokens.shape[1]
            valid = torch.arange(count, device=outcome.bonus.device)[None, :] <= outcome.n_accepted[:, None]
            self.skip(outcome.new_tokens, valid)

    def commit(self, tree: DraftTree, nodes: torch.Tensor, outcome: Outcome) -> None:
        """Keep the pending tokens and the accepted nodes already fed; queue the rest plus the bonus token.

        `nodes` [B, M] maps verify positions to draft-tree node indices.
        """
        self.started = False
        batch = outcome.bonus.shape[0]
        depth_count = outcome.path.shape[1]
        on_path = outcome.path >= 0
        path_nodes = nodes.gather(1, outcome.path.clamp(min=0)) if depth_count else outcome.path
        path_slots = torch.where(on_path, tree.draft_slot.gather(1, path_nodes) if depth_count else path_nodes, -1)
        fed = path_slots >= 0
        pending = self.pending_valid.shape[1]
        pending_slots = torch.arange(pending, device=fed.device).expand(batch, pending)
        slots = torch.cat([pending_slots, path_slots], dim=1)
        keep_mask = torch.cat([self.pending_valid, fed], dim=1)
        order = torch.sort((~keep_mask).int(), dim=1, stable=True).indices  # kept slots first, in order
        self.runner.commit(slots.gather(1, order), keep_mask.sum(dim=1))
        # Accepted but never fed: at most the last accepted node (its parent was fed, or it would not exist).
        unfed = on_path & ~fed
        tokens = torch.where(on_path, outcome.new_tokens[:, :depth_count], 0)
        pend_tok = torch.cat([tokens, outcome.bonus[:, None]], dim=1)
        pend_valid = torch.cat([unfed, torch.ones(batch, 1, dtype=torch.bool, device=unfed.device)], dim=1)
        self.set_pending(pend_tok, pend_valid)

    def skip(self, new_tokens: torch.Tensor, new_valid: torch.Tensor) -> None:
        """A step without drafting: the accepted tokens simply join the pending queue."""
        tokens = torch.cat([self.pending, new_tokens], dim=1)
        self.set_pending(tokens, torch.cat([self.pending_valid, new_valid], dim=1))

    def set_pending(self, tokens: torch.Tensor, valid: torch.Tensor) -> None:
        """Store pending tokens left-aligned-to-the-right (padding first), trimmed to the longest row."""
        order = torch.sort(valid.int(), dim=1, stable=True).indices  # invalid first, valid last, order kept
        tokens, valid = tokens.gather(1, order), valid.gather(1, order)
        width = max(int(valid.sum(dim=1).max()), 1)
        self.pending, self.pending_valid = tokens[:, -width:], valid[:, -width:]

    def keep_rows(self, rows: list[int]) -> None:
        self.runner.keep_rows(rows)
        index = torch.tensor(rows, dtype=torch.long, device=self.pending.device)
        self.set_pending(self.pending.index_select(0, index), self.pending_valid.index_select(0, index))
