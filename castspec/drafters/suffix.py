"""Draft-free candidates: continuations of the current context's longest earlier occurrence (issue 15).

Text repeats itself: code reuses identifiers and whole lines, summaries and RAG answers copy spans of the prompt,
follow-up turns quote earlier output. `SuffixIndex` keeps, per sequence, every n-gram (n = 1 .. `max_match`) of the
prompt and the output so far with the positions where it ended, updated as tokens arrive (O(max_match) per token).
`propose` looks up the longest suffix of the sequence that occurred before, and merges what followed its most recent
occurrences into a small trie: each node carries the empirical probability of its token given its parent (how many
of the occurrences that reached the parent continued with it) and its depth. It costs microseconds and never a
model forward; the target still verifies every token, so it is lossless like any drafter.

This module is only the index and the proposal trie; how its candidates join an LM draft's in one tree (and how
CAST calibrates their acceptance) is the engine's business.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Candidate:
    """One proposed node: `parent` is an index into the same list (-1: a child of the current last token)."""

    token: int
    parent: int
    depth: int  # 1 for a child of the last token
    prob: float  # empirical P(token | path to parent), over the occurrences that reached the parent
    logscore: float  # sum of log(prob) along the path: comparable across depths, like a draft's log-probability
    count: int  # occurrences that continued this way
    match_len: int  # length of the suffix that matched (longer: more reliable)


@dataclass
class SuffixIndex:
    """n-gram positions of one sequence; `extend` as tokens arrive, `propose` before each step."""

    max_match: int = 8  # longest suffix looked up
    max_occurrences: int = 16  # most recent earlier occurrences merged into the trie
    tokens: list[int] = field(default_factory=list)
    _ends: dict[tuple[int, ...], list[int]] = field(default_factory=dict)  # n-gram -> end positions, ascending

    def extend(self, new_tokens: list[int]) -> None:
        """Append tokens and index every n-gram that ends at one of them."""
        for token in new_tokens:
            self.tokens.append(int(token))
            end = len(self.tokens) - 1
            for n in range(1, min(self.max_match, end + 1) + 1):
                self._ends.setdefault(tuple(self.tokens[end - n + 1:end + 1]), []).append(end)

    def longest_match(self) -> tuple[int, list[int]]:
        """(n, end positions of earlier occurrences of the last n tokens) for the largest n that has any."""
        last = len(self.tokens) - 1
        for n in range(min(self.max_match, last), 0, -1):
            ends = self._ends.get(tuple(self.tokens[last - n + 1:]), [])
            earlier = ends[:-1] if ends and ends[-1] == last else ends  # the current occurrence is not a match
            if earlier:
                return n, earlier
        return 0, []

    def propose(self, max_depth: int = 8, max_nodes: int = 32) -> list[Candidate]:
        """The merged continuations of the longest match's most recent occurrences, best-first per level,
        breadth-first overall (a node's parent always comes before it); empty when nothing matches."""
        n, ends = self.longest_match()
        if not ends or max_depth < 1 or max_nodes < 1:
            return []
        starts = [end + 1 for end in ends[-self.max_occurrences:]]
        out: list[Candidate] = []
        frontier = [(-1, starts, 0.0)]  # (candidate index, occurrence offsets reaching it, its logscore)
        for depth in range(1, max_depth + 1):
            next_frontier = []
            for parent, offsets, parent_score in frontier:
                groups: dict[int, list[int]] = {}
                for offset in offsets:
                    position = offset + depth - 1
                    if position < len(self.tokens):
                        groups.setdefault(self.tokens[position], []).append(offset)
                reached = sum(len(g) for g in groups.values())
                for token, group in sorted(groups.items(), key=lambda item: -len(item[1])):
                    if len(out) >= max_nodes:
                        return out
                    prob = len(group) / reached
                    score = parent_score + math.log(prob)
                    out.append(Candidate(token, parent, depth, prob, score, len(group), n))
                    next_frontier.append((len(out) - 1, group, score))
            if not next_frontier:
                break
            frontier = next_frontier
        return out
