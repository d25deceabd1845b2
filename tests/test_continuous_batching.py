"""A live batch that sequences join and leave between steps (what `castspec serve` drives).

Each greedy sequence must come out exactly as it does alone, whenever it joins, whoever shares its steps, and
whoever leaves; a seeded sampled sequence alone is reproducible; a cancelled one costs nothing more."""

from __future__ import annotations

import pytest
import torch

from castspec.cost.table import OnlineCosts
from castspec.engine import SpeculativeGenerator
from castspec.errors import CastspecError
from castspec.verify import SamplingConfig, TokenChooser
from tests.conftest import ToyTokenizer, drive_live_batch, on_test_device, reference_greedy, tiny_model
from tests.test_cast import FLAT

PROMPTS = [[5, 17, 33], [11], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 41], [7, 7, 7, 7]]
POLICIES = ["ar", "chain:gamma=3", "eagle2:total_tokens=10,depth=3,top_k=3", "cast", "cast:mode=paper"]
GREEDY = SamplingConfig()


@pytest.fixture(scope="module")
def target():
    return on_test_device(tiny_model("qwen2", seed=0, sharpen=30.0))


def generator(target, policy: str, lazy_draft: bool = False) -> SpeculativeGenerator:
    draft = on_test_device(tiny_model("qwen2", seed=3, layers=1, sharpen=30.0))  # disagrees sometimes
    return SpeculativeGenerator(target, ToyTokenizer(), draft=draft, policy=policy, costs=OnlineCosts(FLAT),
                                lazy_draft=lazy_draft)


def run_schedule(gen: SpeculativeGenerator, arrivals: dict[int, list[int]], budgets: list[int],
                 cancel: dict[int, list[int]] | None = None) -> dict[int, list[int]]:
    """Step a live batch; before step s, the sequences `arrivals[s]` join and `cancel[s]` leave."""
    joins = {step: (keys, [PROMPTS[k] for k in keys], [budgets[k] for k in keys], [TokenChooser(GREEDY) for _ in keys])
             for step, keys in arrivals.items()}
    return drive_live_batch(gen, joins, cancel)


@pytest.mark.parametrize("policy", POLICIES)
def test_joining_and_leaving_rows_keep_every_output_exact(target, policy):
    gen = generator(target, policy)
    budgets = [12, 5, 16, 9, 14]
    outs = run_schedule(gen, {0: [0], 2: [1, 2], 3: [3], 6: [4]}, budgets)
    for key, prompt in enumerate(PROMPTS):
        assert outs[key] == reference_greedy(target, prompt, budgets[key]), (policy, key)


def test_rows_joining_a_lazy_draft_before_and_after_its_purchase_stay_exact(target):
    """The draft model bought mid-batch is prefilled on every live row's sequence so far; rows joining later get it
    at once; the rows stay exact either way (`castspec serve` drives this with the default lazy draft)."""
    gen = generator(target, "cast", lazy_draft=True)
    gen.drafter.prefill_ms = lambda rows, tokens: 1e-9  # bought after the first step the repeats cannot shorten
    budgets = [12, 5, 16, 9, 14]
    outs = run_schedule(gen, {0: [0], 2: [1, 2], 3: [3], 6: [4]}, budgets)
    assert gen.drafter.bought
    for key, prompt in enumerate(PROMPTS):
        assert outs[key] == reference_greedy(target, prompt, budgets[key]), key


def test_rows_joining_after_the_batch_emptied_start_fresh(target):
    gen = generator(target, "cast")
    outs = run_schedule(gen, {0: [1], 9: [0, 3]}, [10, 2, 10, 10, 10])  # key 1 is done long before step 9
    for key in (0, 1, 3):
        assert outs[key] == reference_greedy(target, PROMPTS[key], 2 if key == 1 else 10)


def test_a_cancelled_row_leaves_and_the_others_are_untouched(target):
    gen = generator(target, "eagle2:total_tokens=10,depth=3,top_k=3")
    budgets = [20, 20, 20, 20, 20]
    outs = run_schedule(gen, {0: [0, 2, 4]}, budgets, cancel={2: [2]})
    assert len(outs[2]) < 20
    assert outs[2] == reference_greedy(target, PROMPTS[2], 20)[: len(outs[2])]
    for key in (0, 4):
        assert outs[key] == reference_greedy(target, PROMPTS[key], 20)


def test_step_after_a_cancel_never_feeds_the_cancelled_row(target):
    gen = generator(target, "chain:gamma=3")
    state = gen.open_batch()
    gen.add_rows(state, [0, 1], PROMPTS[:2], [10, 10], [TokenChooser(GREEDY)] * 2)
    gen.remove_rows(state, [0])
    assert state.rows == [1] and gen.target.batch_size == 1 and gen.drafter.runner.batch_size == 1
    assert all(key == 1 for key, _, _ in gen.step(state))


@pytest.mark.parametrize("policy", ["cast", "eagle2:total_tokens=10,depth=3,top_k=3"])
def test_a_seeded_sampled_row_is_the_same_alone_again_and_in_a_live_batch(target, policy):
    """Its uniforms depend on the seed and the output index only: not on tree shapes (CAST's change as it learns)
    nor on the rows beside it."""
    gen = generator(target, policy)
    sampled = SamplingConfig(temperature=0.8, top_k=20, seed=123)
    alone = gen.generate(PROMPTS[0], max_new_tokens=12, temperature=0.8, top_k=20, seed=123).token_ids
    assert gen.generate(PROMPTS[0], max_new_tokens=12, temperature=0.8, top_k=20, seed=123).token_ids == alone
    outs = drive_live_batch(gen, {0: ([1, 2], [PROMPTS[2], PROMPTS[3]], [12, 12], [gen.chooser(GREEDY)] * 2),
                                  2: ([0], [PROMPTS[0]], [12], [gen.chooser(sampled)])})
    assert outs[0] == alone
    assert outs[1] == reference_greedy(target, PROMPTS[2], 12)  # the greedy rows are exact beside a sampled one
    assert outs[2] == reference_greedy(target, PROMPTS[3], 12)


def test_keys_must_be_unique(target):
    gen = generator(target, "ar")
    state = gen.open_batch()
    gen.add_rows(state, [4], [PROMPTS[0]], [5], [TokenChooser(GREEDY)])
    with pytest.raises(CastspecError, match="unique"):
        gen.add_rows(state, [4], [PROMPTS[1]], [5], [TokenChooser(GREEDY)])


@pytest.mark.parametrize("where", ["target", "draft"])
def test_a_row_that_fails_to_join_leaves_the_live_rows_as_they_were(target, where, monkeypatch):
    """A failed prefill (here: a token id outside the vocabulary, or the draft failing) must not cost the live rows
    their caches: they go on exactly, and the failed row leaves no record behind."""
    gen = generator(target, "chain:gamma=3")
    state = gen.open_batch()
    outs: dict[int, list[int]] = {}
    for key, tokens, _ in gen.add_rows(state, [0, 1], PROMPTS[:2], [12, 12], [TokenChooser(GREEDY)] * 2):
        outs.setdefault(key, []).extend(tokens)
    for key, tokens, _ in gen.step(state):
        outs[key].extend(tokens)
    if where == "draft":
        def broken(*args, **kwargs):
            raise RuntimeError("draft prefill failed")
        monkeypatch.setattr(gen.drafter, "add_rows", broken)
    bad = [5, 10_000] if where == "target" else PROMPTS[2]
    with pytest.raises((IndexError, RuntimeError)):
        gen.add_rows(state, [7], [bad], [12], [TokenChooser(GREEDY)])
    monkeypatch.undo()
    assert state.rows == [0, 1] and 7 not in state.stats and 7 not in state.choosers
    assert gen.target.batch_size == 2 and gen.drafter.runner.batch_size == 2
    while state.rows:
        for key, tokens, _ in gen.step(state):
            outs[key].extend(tokens)
    for key in (0, 1):
        assert outs[key] == reference_greedy(target, PROMPTS[key], 12)


def test_forget_drops_records_of_rows_that_left_only(target):
    gen = generator(target, "ar")
    state = gen.open_batch()
    gen.add_rows(state, [0, 1], PROMPTS[:2], [1, 8], [TokenChooser(GREEDY)] * 2)  # key 0 is done at once
    state.forget([0, 1])
    assert set(state.stats) == set(state.choosers) == set(state.budget) == {1}


def test_room_is_what_fits_after_the_prompt(target):
    gen = generator(target, "ar")
    assert gen.room(100) == 1024 - 100 - 256
    gen._check_lengths(100, gen.room(100))
    with pytest.raises(CastspecError, match="exceeds the model's context"):
        gen._check_lengths(100, gen.room(100) + 1)


def test_kv_cache_append_rows_keeps_both_sides():
    from castspec.models.kv_cache import TreeKVCache

    def filled(rows: int, length: int, capacity: int, value: float) -> TreeKVCache:
        cache = TreeKVCache(2, rows, capacity, "cpu", torch.float32)
        cache.kv = torch.full((2, 2, rows, 1, capacity, 3), value)
        cache.set_lengths(torch.full((rows,), length))
        return cache

    live, new = filled(2, 5, 8, 1.0), filled(1, 7, 12, 2.0)
    live.append_rows(new)
    assert live.kv.shape == (2, 2, 3, 1, 12, 3) and live.length.tolist() == [5, 5, 7]
    assert bool((live.kv[:, :, :2, :, :5] == 1).all()) and bool((live.kv[:, :, 2, :, :7] == 2).all())
