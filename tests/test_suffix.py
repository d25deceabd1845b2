"""The draft-free suffix index and drafter: what they match and propose, and that they stay consistent."""

from __future__ import annotations

import math
import random

import pytest
import torch

from castspec.drafters.base import NO_SCORE, NO_TOKEN, SOURCE_BOTH, SOURCE_LM, Proposals, suffix_source
from castspec.drafters.suffix import SuffixDrafter, SuffixIndex
from castspec.tree import DraftTree


def index_of(tokens: list[int], **kwargs) -> SuffixIndex:
    index = SuffixIndex(**kwargs)
    index.extend(tokens)
    return index


def test_nothing_repeats_nothing_proposed():
    assert index_of([1, 2, 3, 4]).children([], 4) == ([], [], 0)
    assert index_of([5]).children([], 4) == ([], [], 0)


def test_a_repeated_span_continues_and_a_path_extends_the_match():
    index = index_of([7, 1, 2, 3, 4, 5, 9, 1, 2])  # "1 2" occurred before, followed by 3 4 5
    assert index.children([], 3) == ([3], [1.0], 2)
    assert index.children([3], 3) == ([4], [1.0], 3)  # the path "3" makes the suffix "1 2 3"
    assert index.children([3, 4], 3) == ([5], [1.0], 4)


def test_the_longest_match_wins_and_frequencies_are_empirical():
    a, b, c, d, x = 1, 2, 3, 4, 5
    tokens, probs, n = index_of([a, b, c, 9, a, b, d, 9, a, b, c, 8, a, b]).children([], 4)
    assert (tokens, n) == ([c, d], 2) and math.isclose(probs[0], 2 / 3) and math.isclose(sum(probs), 1.0)
    assert index_of([x, a, b, c, 9, a, b, d, 9, x, a, b]).children([], 4) == ([c], [1.0], 3)  # "x a b" -> c


def test_extending_token_by_token_equals_indexing_at_once():
    rng = random.Random(1)
    tokens = [rng.randrange(5) for _ in range(120)]
    whole, stepwise = index_of(tokens), SuffixIndex()
    for start in range(0, len(tokens), 7):
        stepwise.extend(tokens[start:start + 7])
    for path in ([], [0], [1, 2], [4, 4, 4]):
        assert stepwise.children(path, 3) == whole.children(path, 3)


def test_the_drafter_proposes_per_row_padded_and_follows_tree_paths():
    drafter = SuffixDrafter()
    drafter.add_rows([[7, 1, 2, 3, 4, 9, 1], [5, 6]], torch.tensor([2, 8]), fresh=True)
    scores, tokens, source = drafter.start(2)
    assert tokens.tolist() == [[[3, NO_TOKEN]], [[NO_TOKEN, NO_TOKEN]]]  # row 1 never repeats itself
    assert scores[0, 0, 0] == 0.0 and bool((scores[1] == NO_SCORE).all())
    assert source[0, 0, 0] == suffix_source(2)  # found by the 2-token match "1 2"
    tree = DraftTree.empty(torch.tensor([2, 8]))
    tree.add_level(tokens[:, 0, :1], torch.full((2, 1), -1), scores[:, 0, :1], source[:, 0, :1])
    scores, tokens, source = drafter.expand(tree, torch.zeros(2, 1, dtype=torch.long), 2)
    assert tokens[0, 0, 0] == 4 and tokens[1, 0, 0] == NO_TOKEN  # row 0 follows "1 2 3" -> 4; padding stays padding
    assert source[0, 0, 0] == suffix_source(3)  # the path made the match one token longer


def test_the_drafter_learns_accepted_tokens_and_keeps_rows():
    from castspec.verify import Outcome

    drafter = SuffixDrafter()
    drafter.add_rows([[1, 2, 3], [4, 5]], torch.tensor([1, 4]), fresh=True)
    outcome = Outcome(path=torch.zeros(2, 1, dtype=torch.long), n_accepted=torch.tensor([1, 0]),
                      bonus=torch.tensor([3, 6]), new_tokens=torch.tensor([[2, 3], [6, 0]]))
    drafter.finish_step(DraftTree.empty(torch.tensor([0, 0])), torch.zeros(2, 1, dtype=torch.long), outcome)
    assert drafter.rows[0].tokens == [1, 2, 3, 1, 2, 3] and drafter.rows[1].tokens == [4, 5, 4, 6]
    drafter.add_rows([[9, 9]], torch.tensor([9]))
    drafter.keep_rows([0, 2])
    assert [r.tokens for r in drafter.rows] == [[1, 2, 3, 1, 2, 3], [9, 9, 9]]
    assert drafter.start(1)[1][:, 0, 0].tolist() == [1, 9]


def test_merged_children_keep_each_token_once_with_its_best_score():
    from castspec.drafters.suffix import merge_children

    lm = Proposals.from_lm(torch.tensor([[[-0.1, -1.0, -2.0]]]), torch.tensor([[[5, 6, 7]]]))
    suffix = Proposals(torch.tensor([[[0.0, -0.5, NO_SCORE]]]), torch.tensor([[[6, 5, NO_TOKEN]]]),
                       torch.tensor([[[suffix_source(4), suffix_source(1), suffix_source(1)]]]))
    scores, tokens, source = merge_children(lm, suffix, 3)
    assert tokens.tolist() == [[[6, 5, 7]]] and scores.tolist() == [[[0.0, pytest.approx(-0.1), -2.0]]]
    assert source.tolist() == [[[SOURCE_BOTH, SOURCE_BOTH, SOURCE_LM]]]  # 6 and 5 came from both, 7 from the LM
    only_suffix = merge_children(Proposals.from_lm(torch.tensor([[[-0.1]]]), torch.tensor([[[9]]])),
                                 Proposals(suffix.scores[..., :1], suffix.tokens[..., :1], suffix.source[..., :1]), 2)
    assert only_suffix.tokens.tolist() == [[[6, 9]]]
    assert only_suffix.source.tolist() == [[[suffix_source(4), SOURCE_LM]]]  # each keeps its own source
    scores, tokens, _ = merge_children(suffix, suffix, 3)  # only padding left to fill: it stays padding, last
    assert tokens.tolist() == [[[6, 5, NO_TOKEN]]]


def test_match_length_bands_are_distinct_sources():
    assert [suffix_source(n) for n in (1, 2, 3, 4, 7, 8, 20)] == [1, 2, 2, 3, 3, 4, 4]
    assert len({SOURCE_LM, SOURCE_BOTH, *(suffix_source(n) for n in (1, 2, 4, 8))}) == 6


def test_the_cache_copies_from_earlier_outputs_and_forgets_the_oldest():
    from castspec.drafters.suffix import SEPARATOR

    drafter = SuffixDrafter(cache_size=2)
    drafter.add_rows([[1, 2]], torch.tensor([50]), fresh=True)
    drafter.rows[0].extend([51, 52, 53])  # its output: 50 51 52 53
    drafter.keep_rows([])  # it finished
    drafter.add_rows([[7, 8, 50]], torch.tensor([51]), fresh=True)  # never repeats itself, but an earlier answer
    assert drafter.start(2).tokens.tolist() == [[[52, NO_TOKEN]]]
    assert drafter.cache.index.tokens == [50, 51, 52, 53, SEPARATOR]
    drafter.rows[0].extend([60])
    drafter.add_rows([[9]], torch.tensor([9]), fresh=True)  # a fresh batch: the last rows' outputs join too
    assert drafter.cache.outputs == [[50, 51, 52, 53], [51, 60]]
    assert drafter.cache.index.continuations([53], 2) == ([], [], 0)  # 53 ended an output: nothing follows
    drafter.rows[0].extend([70])
    drafter.keep_rows([])
    assert drafter.cache.outputs == [[51, 60], [9, 70]]  # size 2: the oldest is gone
    assert drafter.cache.index.continuations([50, 51], 2) == ([60], [1.0], 1)


def test_target_only_speculation_with_a_cache_copies_an_earlier_answer_and_stays_exact():
    from castspec.engine import SpeculativeGenerator
    from tests.conftest import ToyTokenizer, reference_greedy, tiny_model

    model = tiny_model("qwen2", seed=3, sharpen=30.0)
    gen = SpeculativeGenerator(model, ToyTokenizer(), draft=SuffixDrafter(cache_size=4), policy="chain:gamma=4")
    prompt = [11, 23, 5, 41, 7]
    first = gen.generate(prompt, max_new_tokens=24)
    second = gen.generate(prompt, max_new_tokens=24)
    assert first.token_ids == second.token_ids == reference_greedy(model, prompt, 24)
    assert sum(second.stats.accepted) > sum(first.stats.accepted)
    assert second.stats.steps < first.stats.steps
