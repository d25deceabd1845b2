"""The greedy head (`castspec.models.greedy_head`) returns exactly the full output head's argmax, ties included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from castspec.engine import SpeculativeGenerator
from castspec.models.gguf_format import GGUFLinear, quantize_q6k
from castspec.models.greedy_head import GreedyHead, greedy_head_of, use_greedy_head
from castspec.models.native import unavailable_reason
from castspec.models.runner import CausalLMRunner
from tests.conftest import ToyTokenizer, tiny_model
from tests.test_formats import q4k_model

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason="castspec's CPU kernels cannot run here")

COLUMNS, INPUTS = 8 * 60 + 5, 512  # a last group with 5 real columns and 3 of padding


def q6k_head(seed: int = 0) -> GGUFLinear:
    weight = np.random.default_rng(seed).standard_normal((COLUMNS, INPUTS)).astype(np.float32) * 0.05 + 0.1
    weight[300] = weight[37]  # two columns with the same blocks: their logits tie exactly
    return GGUFLinear(quantize_q6k(weight), "Q6_K")


def test_the_greedy_head_returns_the_full_heads_argmax_with_ties_to_the_first_column():
    head = q6k_head()
    greedy = GreedyHead.build(head)
    weight = head.dequantized()
    generator = torch.Generator().manual_seed(1)
    flat = torch.randn(64, INPUTS, generator=generator)  # no clear winner: many columns survive the bounds
    peaked = 40 * weight[torch.randint(0, COLUMNS, (64,), generator=generator)] + torch.randn(64, INPUTS,
                                                                                             generator=generator)
    tie = 40 * weight[37:38]  # columns 37 and 300 on top, equal
    last = 40 * weight[COLUMNS - 1:]  # the winner in the last, padded group
    negative = -torch.ones(1, INPUTS)  # every logit ~ -51: the padding columns' zeros must not win
    rows = torch.cat([flat, peaked, tie, last, negative])
    full = head(rows).argmax(dim=-1)
    assert full[128] == 37 and full[129] == COLUMNS - 1 and head(negative).max() < 0
    assert torch.equal(greedy.argmax(rows), full)
    for row, expected in zip(rows, full, strict=True):  # alone, as a decoding step has it
        assert greedy.argmax(row[None, None]).item() == expected
    kept = []
    for row in peaked[:8]:
        greedy.argmax(row[None])
        kept.append(greedy.last_groups)
    assert max(kept) < (COLUMNS + 7) // 8 // 4, f"a clear winner should rule out most of the head: {kept}"


def test_without_its_bounds_the_coarse_head_alone_would_pick_other_tokens():
    """The rows above include cases where the coarse copy's own ranking is wrong, so the bounds are what makes the
    greedy head exact (this checks that the test above can fail)."""
    head = q6k_head()
    greedy = GreedyHead.build(head)
    rows = torch.randn(64, INPUTS, generator=torch.Generator().manual_seed(1))
    greedy.bound = torch.zeros_like(greedy.bound)
    assert not torch.equal(greedy.argmax(rows), head(rows).argmax(dim=-1))


def test_forward_greedy_equals_the_argmax_of_forward_over_a_tree_and_a_batch():
    model = q4k_model(seed=3)
    assert use_greedy_head(model)
    runner = CausalLMRunner(model)
    assert runner.greedy_head is greedy_head_of(model) is not None
    runner.prefill([[5, 6, 7, 8], [9, 10, 11]])
    tokens = torch.tensor([[7, 10, 11, 12], [3, 4, 5, 6]])
    parents = [-1, 0, 0, 1]
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    for node, parent in enumerate(parents):
        if parent >= 0:
            mask[:, node] = mask[:, parent]
        mask[:, node, node] = True
    positions = runner.next_pos[:, None] + torch.tensor([0, 1, 1, 2])
    runner.begin_block()
    ids = runner.forward_greedy(tokens, positions, mask)
    runner.begin_block()
    assert torch.equal(ids, runner.forward(tokens, positions, mask).argmax(dim=-1))


@pytest.mark.parametrize("policy", ["ar", "chain:gamma=3"])
def test_greedy_decoding_is_the_same_with_and_without_the_greedy_head(policy):
    target = q4k_model(seed=4)
    draft = tiny_model("qwen2", seed=4, layers=1, sharpen=4.0).float()
    prompts = [[5, 6, 7, 8, 9], [20, 21, 22]]
    plain = SpeculativeGenerator(target, ToyTokenizer(), draft=draft, policy=policy)
    assert plain.target.greedy_head is None
    expected = [r.token_ids for r in plain.generate_batch(prompts, max_new_tokens=20)]
    assert use_greedy_head(target)
    gen = SpeculativeGenerator(target, ToyTokenizer(), draft=draft, policy=policy)
    assert gen.target.greedy_head is not None
    assert [r.token_ids for r in gen.generate_batch(prompts, max_new_tokens=20)] == expected


def test_a_large_heads_coarse_copy_is_cached_and_a_damaged_cache_is_rebuilt(tmp_path, monkeypatch, capsys):
    from castspec.models import greedy_head

    monkeypatch.setenv("CASTSPEC_HOME", str(tmp_path))
    monkeypatch.setattr(greedy_head, "CACHE_BYTES", 0)  # cache every head
    head = q6k_head()
    rows = torch.randn(8, INPUTS, generator=torch.Generator().manual_seed(2))
    first = GreedyHead.build(head)
    [cached] = (tmp_path / "greedy_heads").glob("*.pt")
    build = greedy_head._coarse_and_bound
    monkeypatch.setattr(greedy_head, "_coarse_and_bound", lambda h: pytest.fail("built although cached"))
    again = GreedyHead.build(head)
    assert torch.equal(again.bound, first.bound) and torch.equal(again.coarse.blocks, first.coarse.blocks)
    assert torch.equal(again.argmax(rows), head(rows).argmax(dim=-1))
    cached.write_bytes(b"not a checkpoint")
    monkeypatch.setattr(greedy_head, "_coarse_and_bound", build)
    assert torch.equal(GreedyHead.build(head).bound, first.bound)
    assert torch.equal(torch.load(cached, weights_only=True)["bound"], first.bound)  # replaced by a good copy
    monkeypatch.setenv("CASTSPEC_HOME", str(cached / "inside-a-file"))  # cannot be created
    assert torch.equal(GreedyHead.build(head).argmax(rows), head(rows).argmax(dim=-1))
    assert "could not cache the greedy head" in capsys.readouterr().err


def test_where_the_bounds_rule_out_little_the_full_head_is_read_and_the_coarse_pass_tried_again_later():
    head = q6k_head()
    greedy = GreedyHead.build(head)
    weight = head.dequantized()
    generator = torch.Generator().manual_seed(3)
    flat = torch.randn(16, 4, INPUTS, generator=generator)  # nothing stands out: most groups survive the bounds
    peaked = 40 * weight[torch.randint(0, COLUMNS, (16, 4), generator=generator)]
    tries = []
    for rows in flat:
        before = greedy.full_calls
        assert torch.equal(greedy.argmax(rows), head(rows).argmax(dim=-1))
        tries.append(greedy.full_calls == before)
    assert tries[:2] == [True, False] and greedy.share > 0.3, "expensive: the full head from the next call on"
    assert tries[2:8] == [False] * 6 and tries[8], "tried again after 8 calls"
    assert tries[9:] == [False] * 7, "then after 16"
    for step, rows in enumerate(peaked):
        assert torch.equal(greedy.argmax(rows), head(rows).argmax(dim=-1))
        if step == 8:
            settled = greedy.full_calls
    assert greedy.share < 0.3 and greedy.full_calls == settled, "back on the coarse pass once a try was cheap"
