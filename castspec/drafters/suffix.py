"""Draft-free candidates: continuations of the current context's longest earlier occurrence (issue 15).

Text repeats itself: code reuses identifiers and whole lines, summaries and RAG answers copy spans of the prompt,
follow-up turns quote earlier output. `SuffixIndex` keeps, per sequence, every n-gram (n = 1 .. `max_match`) of the
prompt and the output so far with the positions where it ended, updated as tokens arrive (O(max_match) per token).
`children(path)` looks up the longest suffix of the sequence extended by a tree path that occurred before, and counts
what followed its most recent occurrences: each proposed child carries the empirical probability of its token given
the path. It costs microseconds and never a model forward; the target still verifies every token, so it is lossless
like any drafter.

`SuffixDrafter` proposes from it through the drafter interface (`castspec.drafters.base`): target-only
speculation (`--draft none`). `MixedDrafter` merges its candidates with a draft LM's in one tree (`--suffix`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from castspec.drafters.base import NO_SCORE, NO_TOKEN, SOURCE_BOTH, Drafter, Proposals, suffix_source
from castspec.tree import DraftTree
from castspec.verify import Outcome


@dataclass
class SuffixIndex:
    """n-gram positions of one sequence; `extend` as tokens arrive, `children` while a tree grows."""

    max_match: int = 8  # longest suffix looked up
    max_occurrences: int = 16  # most recent earlier occurrences counted
    tokens: list[int] = field(default_factory=list)
    _ends: dict[tuple[int, ...], list[int]] = field(default_factory=dict)  # n-gram -> end positions, ascending

    def extend(self, new_tokens: list[int]) -> None:
        """Append tokens and index every n-gram that ends at one of them."""
        for token in new_tokens:
            self.tokens.append(int(token))
            end = len(self.tokens) - 1
            for n in range(1, min(self.max_match, end + 1) + 1):
                self._ends.setdefault(tuple(self.tokens[end - n + 1:end + 1]), []).append(end)

    def children(self, path: list[int], k: int) -> tuple[list[int], list[float], int]:
        """The k most frequent next tokens after the sequence extended by `path` (a tree node's tokens below the
        current last token): (tokens, empirical probabilities, matched length). Looks up the longest suffix of
        sequence + path (up to `max_match`) that occurred before and counts what followed its most recent
        `max_occurrences` occurrences; nothing when no suffix occurred before."""
        tail = self.tokens[-self.max_match:] + list(path)  # the last tokens are all a lookup needs
        return self.continuations(tail, k, longest=len(self.tokens) + len(path) - 1)

    def continuations(self, tail: list[int], k: int, longest: int | None = None) -> tuple[list[int], list[float], int]:
        """Like `children`, for any text ending in `tail` (e.g. another sequence's): what followed the longest
        suffix of `tail` (at most `longest` tokens) found here. Separators (`SEPARATOR`) are never proposed."""
        longest = len(tail) if longest is None else longest
        for n in range(min(self.max_match, longest, len(tail)), 0, -1):
            key = tuple(tail[len(tail) - n:])
            ends = [e for e in self._ends.get(key, []) if e + 1 < len(self.tokens) and self.tokens[e + 1] != SEPARATOR]
            if not ends:
                continue
            counts: dict[int, int] = {}
            for end in ends[-self.max_occurrences:]:
                counts[self.tokens[end + 1]] = counts.get(self.tokens[end + 1], 0) + 1
            total = sum(counts.values())
            best = sorted(counts.items(), key=lambda item: -item[1])[:k]  # ties: the earlier-seen token first
            return [t for t, _ in best], [c / total for _, c in best], n
        return [], [], 0


SEPARATOR = -2  # between sequences in a `SuffixCache`: no n-gram a real text has contains it


class SuffixCache:
    """The outputs of the last `size` finished sequences of this process, indexed together (`--suffix-cache N`).

    Requests to one server repeat each other (the same task, tool calls, boilerplate): a sequence can then copy from
    an earlier answer as well as from its own text. Outputs only: a prompt is the sequence's own to copy from.
    Rebuilt when the oldest output is dropped, so its cost stays bounded by `size` outputs.
    """

    def __init__(self, size: int, max_match: int = 8, max_occurrences: int = 16):
        self.size, self.max_match, self.max_occurrences = size, max_match, max_occurrences
        self.outputs: list[list[int]] = []
        self.index = SuffixIndex(max_match, max_occurrences)

    def add(self, output: list[int]) -> None:
        if self.size <= 0 or not output:
            return
        self.outputs.append(list(output))
        if len(self.outputs) > self.size:
            self.outputs = self.outputs[-self.size:]
            self.index = SuffixIndex(self.max_match, self.max_occurrences)
            for earlier in self.outputs[:-1]:
                self.index.extend(earlier + [SEPARATOR])
        self.index.extend(self.outputs[-1] + [SEPARATOR])


class SuffixDrafter(Drafter):
    """Draft-free proposals from each sequence's own repeats (`SuffixIndex` per row): no model, no forward.

    Host-side by nature: each level reads the frontier's paths to the CPU and returns small tensors to the tree's
    device (one transfer each way per level, the drafter's explicit boundary). A node's log-score is the log of its
    empirical probability given its parent; padding (`NO_TOKEN`, `NO_SCORE`) fills nodes with fewer than k children.
    """

    free = True

    def __init__(self, device: torch.device | str = "cpu", max_match: int = 8, max_occurrences: int = 16,
                 cache_size: int = 0):
        """`cache_size` N > 0: also copy from the outputs of the last N sequences that finished (`SuffixCache`)."""
        self.device = torch.device(device)
        self.max_match, self.max_occurrences = max_match, max_occurrences
        self.rows: list[SuffixIndex] = []
        self.prompt_lens: list[int] = []  # where each row's output starts in its index
        self.cache = SuffixCache(cache_size, max_match, max_occurrences) if cache_size > 0 else None

    @property
    def vocab_size(self) -> int:
        return 2**31 - 1  # no fixed vocabulary: as many children as the text offers

    def add_rows(self, prompts: list[list[int]], first_token: torch.Tensor, budget: int = 0,
                 fresh: bool = False) -> None:
        new = []
        for prompt, first in zip(prompts, first_token.tolist(), strict=True):
            index = SuffixIndex(self.max_match, self.max_occurrences)
            index.extend(list(prompt) + [first])
            new.append(index)
        lens = [len(p) for p in prompts]
        if fresh:
            self._remember(range(len(self.rows)))
        self.rows = new if fresh else self.rows + new
        self.prompt_lens = lens if fresh else self.prompt_lens + lens

    def keep_rows(self, rows: list[int]) -> None:
        self._remember(sorted(set(range(len(self.rows))) - set(rows)))
        self.rows = [self.rows[i] for i in rows]
        self.prompt_lens = [self.prompt_lens[i] for i in rows]

    def _remember(self, leaving) -> None:
        """Rows that leave hand their outputs to the cache (if there is one)."""
        if self.cache is not None:
            for i in leaving:
                self.cache.add(self.rows[i].tokens[self.prompt_lens[i]:])

    def lookup(self, index: SuffixIndex, path: list[int], k: int) -> tuple[list[int], list[float], int]:
        """The row's own continuations, or the cache's where it matches a longer suffix."""
        found = index.children(path, k)
        if self.cache is None:
            return found
        tail = index.tokens[-self.max_match:] + list(path)
        cached = self.cache.index.continuations(tail, k)
        return cached if cached[2] > found[2] else found

    def start(self, k: int) -> Proposals:
        return self._propose([[[]] for _ in self.rows], k)

    def expand(self, tree: DraftTree, frontier: torch.Tensor, k: int) -> Proposals:
        tokens, parents, nodes = tree.tokens.tolist(), tree.parents.tolist(), frontier.tolist()
        paths = []
        for row_tokens, row_parents, row_nodes in zip(tokens, parents, nodes, strict=True):
            row_paths = []
            for node in row_nodes:
                path = []
                while node >= 0:
                    path.append(row_tokens[node])
                    node = row_parents[node]
                row_paths.append(path[::-1])
            paths.append(row_paths)
        return self._propose(paths, k)

    def _propose(self, paths: list[list[list[int]]], k: int) -> Proposals:
        """Children of each row's paths, padded to k, [B, F, k] on the tree's device; the source of each is the
        band of the match length that found it (`suffix_source`)."""
        width = len(paths[0]) if paths else 0
        scores = torch.full((len(paths), width, k), NO_SCORE)
        tokens = torch.full((len(paths), width, k), NO_TOKEN, dtype=torch.long)
        source = torch.full((len(paths), width, k), suffix_source(1), dtype=torch.long)
        for b, (index, row_paths) in enumerate(zip(self.rows, paths, strict=True)):
            for f, path in enumerate(row_paths):
                if path and path[-1] == NO_TOKEN:
                    continue  # a padding node has no continuation
                found, probs, matched = self.lookup(index, path, k)
                if found:
                    tokens[b, f, : len(found)] = torch.tensor(found)
                    scores[b, f, : len(found)] = torch.tensor(probs).log()
                    source[b, f] = suffix_source(matched)
        return Proposals(scores.to(self.device), tokens.to(self.device), source.to(self.device))

    def finish_step(self, tree: DraftTree, nodes: torch.Tensor, outcome: Outcome) -> None:
        """The accepted tokens and the bonus token extend each row's index."""
        new_tokens, accepted = outcome.new_tokens.tolist(), outcome.n_accepted.tolist()
        for index, tokens, count in zip(self.rows, new_tokens, accepted, strict=True):
            index.extend(tokens[: count + 1])


class MixedDrafter(Drafter):
    """A draft LM's children and the suffix drafter's, merged per node into one candidate list (`cast+suffix`).

    Each node gets the k best of the union by log-score, a token proposed by both counting once with its higher
    score; so a long copied span the LM doubts can still be drafted, and the LM fills in where the text does not
    repeat. The LM feeds every expanded node, whichever source proposed it, so its cache contract is unchanged.
    """

    def __init__(self, lm: Drafter, suffix: SuffixDrafter):
        self.lm, self.suffix = lm, suffix

    @property
    def vocab_size(self) -> int:
        return self.lm.vocab_size

    def add_rows(self, prompts: list[list[int]], first_token: torch.Tensor, budget: int = 0,
                 fresh: bool = False) -> None:
        self.lm.add_rows(prompts, first_token, budget, fresh)
        self.suffix.add_rows(prompts, first_token, budget, fresh)

    def keep_rows(self, rows: list[int]) -> None:
        self.lm.keep_rows(rows)
        self.suffix.keep_rows(rows)

    def start(self, k: int) -> Proposals:
        return merge_children(self.lm.start(k), self.suffix.start(k), k)

    def expand(self, tree: DraftTree, frontier: torch.Tensor, k: int) -> Proposals:
        return merge_children(self.lm.expand(tree, frontier, k), self.suffix.expand(tree, frontier, k), k)

    def finish_step(self, tree: DraftTree, nodes: torch.Tensor, outcome: Outcome) -> None:
        self.lm.finish_step(tree, nodes, outcome)
        self.suffix.finish_step(tree, nodes, outcome)


def merge_children(first: Proposals, second: Proposals, k: int) -> Proposals:
    """The k best of two candidate lists [B, F, k] per node, each token once (with its best score); padding last.

    Each list holds distinct tokens, so a token found twice was proposed by both lists: its source becomes
    `SOURCE_BOTH` (two independent sources agreeing are accepted more often than either alone)."""
    scores = torch.cat([first.scores, second.scores.to(first.scores.dtype)], dim=-1)
    tokens = torch.cat([first.tokens, second.tokens], dim=-1)
    source = torch.cat([first.source, second.source], dim=-1)
    same = tokens[..., :, None] == tokens[..., None, :]  # [B, F, 2k, 2k]
    better = (scores[..., None, :] > scores[..., :, None]) | (
        (scores[..., None, :] == scores[..., :, None]) & torch.ones_like(same).triu(1).transpose(-1, -2))
    padding = tokens == NO_TOKEN
    duplicate = (same & better).any(dim=-1) | padding  # a better copy exists, or padding
    source = torch.where((same.sum(dim=-1) > 1) & ~padding, SOURCE_BOTH, source)
    scores = torch.where(duplicate, torch.full_like(scores, NO_SCORE), scores)
    tokens = torch.where(duplicate, torch.full_like(tokens, NO_TOKEN), tokens)
    best = scores.topk(k, dim=-1).indices
    return Proposals(scores.gather(-1, best), tokens.gather(-1, best), source.gather(-1, best))
