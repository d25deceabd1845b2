"""Every policy's greedy output equals the target's own greedy decoding, token for token."""

from __future__ import annotations

import copy

import pytest
import torch

from castspec.cost.table import OnlineCosts
from castspec.engine import SpeculativeGenerator
from tests.conftest import ToyTokenizer, on_test_device, reference_greedy, tiny_model
from tests.test_cast import FLAT

POLICIES = ["ar", "chain", "chain:gamma=1", "static", "static:paths=0;1;0.0;0.0.0;0.0.1",
            "eagle2", "eagle2:total_tokens=8,depth=3,top_k=3", "cast", "cast:mode=paper", "cast:mode=paper,C1=0.5"]
PROMPTS = [[5, 17, 33], [11], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]


def costs() -> OnlineCosts:
    return OnlineCosts(FLAT)


@pytest.fixture(scope="module")
def models(arch):
    target = tiny_model(arch, seed=0, sharpen=30.0)
    # The target drafting for itself accepts everything (deep paths, full commits); a slightly perturbed copy
    # accepts often but not always; an unrelated model rarely. All three must give the target's exact output.
    noisy = copy.deepcopy(target)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.003 * torch.randn_like(p))
    drafts = {"self": target, "noisy": noisy, "random": tiny_model(arch, seed=1, layers=1)}
    return on_test_device(target), {kind: on_test_device(model) for kind, model in drafts.items()}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("draft_kind", ["self", "noisy", "random"])
def test_greedy_matches_target(models, policy, draft_kind):
    target, drafts = models
    gen = SpeculativeGenerator(target, ToyTokenizer(), draft=drafts[draft_kind], policy=policy, costs=costs())
    for prompt, n in zip(PROMPTS, [24, 9, 30], strict=True):
        expected = reference_greedy(target, prompt, n)
        result = gen.generate(prompt, max_new_tokens=n)
        assert result.token_ids == expected, (policy, prompt)
        assert result.stats.new_tokens == len(expected)


@pytest.mark.parametrize("policy", ["chain:gamma=3", "static:paths=0;1;0.0;0.0.0"])
def test_self_draft_accepts_whole_branch(models, policy):
    """With the target as its own draft, every step accepts a full-depth branch: deep commits are exercised."""
    target, drafts = models
    gen = SpeculativeGenerator(target, ToyTokenizer(), draft=drafts["self"], policy=policy)
    result = gen.generate(PROMPTS[0], max_new_tokens=25)
    assert result.token_ids == reference_greedy(target, PROMPTS[0], 25)
    assert result.stats.accepted[:-1] == [3] * (len(result.stats.accepted) - 1)
