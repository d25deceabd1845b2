"""The draft-free suffix index: what it matches, what it proposes, and that it stays consistent as tokens arrive."""

from __future__ import annotations

import math
import random

from castspec.drafters.suffix import SuffixIndex


def index_of(tokens: list[int], **kwargs) -> SuffixIndex:
    index = SuffixIndex(**kwargs)
    index.extend(tokens)
    return index


def test_nothing_repeats_nothing_proposed():
    assert index_of([1, 2, 3, 4]).propose() == []
    assert SuffixIndex().propose() == []


def test_a_repeated_span_is_proposed_as_a_chain():
    index = index_of([7, 1, 2, 3, 4, 5, 9, 1, 2])  # "1 2" occurred before, followed by 3 4 5 9 1 2
    chain = index.propose(max_depth=3)
    assert [c.token for c in chain] == [3, 4, 5]
    assert [c.parent for c in chain] == [-1, 0, 1] and [c.depth for c in chain] == [1, 2, 3]
    assert all(c.prob == 1.0 and c.match_len == 2 for c in chain)


def test_the_longest_match_wins_and_branches_carry_frequencies():
    # after "a b": c (twice) or d (once); after "x a b" only c
    a, b, c, d, x = 1, 2, 3, 4, 5
    index = index_of([a, b, c, 9, a, b, d, 9, a, b, c, 8, a, b])
    first = [cand for cand in index.propose(max_depth=1)]
    assert {(cand.token, cand.count) for cand in first} == {(c, 2), (d, 1)}
    assert first[0].token == c and math.isclose(first[0].prob, 2 / 3)
    assert math.isclose(sum(cand.prob for cand in first), 1.0)
    longer = index_of([x, a, b, c, 9, a, b, d, 9, x, a, b])
    assert [cand.token for cand in longer.propose(max_depth=1)] == [c]  # "x a b" matched: only c followed it


def test_parents_come_first_scores_add_up_and_limits_hold():
    rng = random.Random(0)
    tokens = [rng.randrange(6) for _ in range(300)]
    index = index_of(tokens, max_match=4)
    cands = index.propose(max_depth=5, max_nodes=20)
    assert 0 < len(cands) <= 20
    for i, cand in enumerate(cands):
        assert cand.parent < i
        parent_score = 0.0 if cand.parent < 0 else cands[cand.parent].logscore
        assert math.isclose(cand.logscore, parent_score + math.log(cand.prob))
        assert cand.depth == (1 if cand.parent < 0 else cands[cand.parent].depth + 1) <= 5
    siblings = {}
    for cand in cands:
        siblings.setdefault(cand.parent, []).append(cand.token)
    assert all(len(set(tokens)) == len(tokens) for tokens in siblings.values())  # distinct tokens per parent


def test_extending_token_by_token_equals_indexing_at_once():
    rng = random.Random(1)
    tokens = [rng.randrange(5) for _ in range(120)]
    whole = index_of(tokens)
    stepwise = SuffixIndex()
    for start in range(0, len(tokens), 7):
        stepwise.extend(tokens[start:start + 7])
    assert stepwise.propose() == whole.propose()
    assert stepwise.longest_match() == whole.longest_match()
