"""Batches: each sequence's output equals its own batch-1 greedy output, whatever the lengths and finish times."""

from __future__ import annotations

import pytest

from castspec.cost.table import OnlineCosts
from castspec.engine import SpeculativeGenerator
from tests.conftest import ToyTokenizer, on_test_device, reference_greedy, tiny_model
from tests.test_cast import FLAT

PROMPTS = [[5, 17, 33], [11], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 41]]
POLICIES = ["ar", "chain:gamma=3", "static", "eagle2:total_tokens=10,depth=3,top_k=3", "cast", "cast:mode=paper"]


@pytest.fixture(scope="module")
def target():
    return on_test_device(tiny_model("qwen2", seed=0, sharpen=30.0))


@pytest.mark.parametrize("policy", POLICIES)
def test_batch_matches_each_prompt_alone(target, policy):
    draft = on_test_device(tiny_model("qwen2", seed=0, sharpen=30.0))  # same weights: long accepted paths
    gen = SpeculativeGenerator(target, ToyTokenizer(), draft=draft, policy=policy, costs=OnlineCosts(FLAT))
    results = gen.generate_batch(PROMPTS, max_new_tokens=20)
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result.token_ids == reference_greedy(target, prompt, 20), (policy, prompt)


def test_sequences_finishing_at_different_steps(target):
    """One sequence hits EOS early (its EOS is made the token it is about to produce); the others go on."""
    first = reference_greedy(target, PROMPTS[0], 6)
    tokenizer = ToyTokenizer()
    target.config.eos_token_id = first[3]
    try:
        draft = on_test_device(tiny_model("qwen2", seed=1, layers=1))
        gen = SpeculativeGenerator(target, tokenizer, draft=draft, policy="chain:gamma=2")
        gen.eos_ids = {first[3]}
        results = gen.generate_batch(PROMPTS, max_new_tokens=15)
        for prompt, result in zip(PROMPTS, results, strict=True):
            expected = reference_greedy(target, prompt, 15)
            if first[3] in expected:
                expected = expected[: expected.index(first[3]) + 1]
            assert result.token_ids == expected
        assert len(results[0].token_ids) < 15  # finished early ...
        assert max(len(r.token_ids) for r in results) == 15  # ... while another ran to its budget
    finally:
        target.config.eos_token_id = 2
