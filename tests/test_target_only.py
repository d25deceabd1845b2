"""Suffix drafting: without a draft model (`--draft none`), and merged with one (`cast+suffix`).

Greedy output must equal plain decoding for every policy, alone, in a batch and in a live batch; sampling must
follow the target's law although the trees hold padding nodes; and speculation must actually happen (tokens get
accepted) when the text repeats."""

from __future__ import annotations

import pytest

from castspec.cost.table import OnlineCosts
from castspec.drafters.suffix import SuffixDrafter
from castspec.engine import SpeculativeGenerator
from castspec.policies.base import StepContext
from castspec.verify import SamplingConfig
from tests.conftest import ToyTokenizer, drive_live_batch, on_test_device, reference_greedy, tiny_model
from tests.test_cast import FLAT

REPEATING = [5, 17, 33, 2, 61, 8, 5, 17, 33, 2, 61, 8, 5, 17]  # continues "33 2 61 8 ..." if the model copies
PROMPTS = [REPEATING, [11, 12, 13], [40, 41, 40, 41, 40]]
POLICIES = ["chain:gamma=4", "eagle2:total_tokens=10,depth=4,top_k=2", "cast", "cast:mode=paper"]


@pytest.fixture(scope="module")
def target():
    return on_test_device(tiny_model("qwen2", seed=2, sharpen=30.0))


def target_only(target, policy: str) -> SpeculativeGenerator:
    return SpeculativeGenerator(target, ToyTokenizer(), draft=SuffixDrafter(target.device), policy=policy,
                                costs=OnlineCosts(FLAT))


@pytest.mark.parametrize("policy", POLICIES)
def test_greedy_output_equals_plain_decoding(target, policy):
    gen = target_only(target, policy)
    for prompt in PROMPTS:
        result = gen.generate(prompt, max_new_tokens=24)
        assert result.token_ids == reference_greedy(target, prompt, 24), (policy, prompt)


def test_repeating_text_is_accepted_from_the_suffix_drafter(target):
    """A model that loops (tiny random models soon do) gives the index its own output to copy."""
    gen = target_only(target, "chain:gamma=4")
    stats = gen.generate(REPEATING, max_new_tokens=40).stats
    assert sum(stats.accepted) > 0 and stats.steps < 40


@pytest.mark.parametrize("policy", ["chain:gamma=4", "cast"])
def test_batch_and_live_batch_are_exact(target, policy):
    gen = target_only(target, policy)
    results = gen.generate_batch(PROMPTS, max_new_tokens=16)
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result.token_ids == reference_greedy(target, prompt, 16)
    greedy = gen.chooser(SamplingConfig())
    outs = drive_live_batch(gen, {0: ([0], [PROMPTS[0]], [16], [greedy]),
                                  1: ([1, 2], PROMPTS[1:], [16, 16], [gen.chooser(SamplingConfig())] * 2)})
    for key, prompt in enumerate(PROMPTS):
        assert outs[key] == reference_greedy(target, prompt, 16)


def test_cast_counts_no_drafting_time_for_a_free_drafter():
    from castspec.policies import make_policy

    class NoDraftCosts(OnlineCosts):
        def table_ms(self, role: str, batch: int, context: int, tokens: int) -> float:
            assert role != "draft", "a free drafter's cost was looked up"
            return super().table_ms(role, batch, context, tokens)

    policy = make_policy("cast")
    policy.attach_costs(NoDraftCosts(FLAT))
    policy.begin_step(StepContext(batch_size=1, context_len=100, remaining=50, draft_free=True))
    assert policy.draft_ms == 0.0 and max(policy.draft_w_ms) == 0.0


@pytest.mark.parametrize("merged", [False, True], ids=["suffix-only", "merged-with-draft-model"])
def test_sampling_with_padding_nodes_follows_the_target_law(merged):
    """Chi-square against the exact law of 4 sampled tokens (vocabulary 8), trees from the suffix drafter (padding
    nodes where a path has fewer continuations than k), alone or merged with a draft model's candidates (a node
    either source proposed, or both)."""
    from tests.test_sampling import FixedCosts, chi_square_p_value, exact_joint, small_model

    model = small_model(0, 3.0)
    prompt = [5, 7, 1, 5, 7, 1, 5, 7]
    config = SamplingConfig(temperature=1.0)
    draft = small_model(1, 2.0) if merged else SuffixDrafter()
    gen = SpeculativeGenerator(model, ToyTokenizer(), draft=draft, policy="eagle2:total_tokens=8,depth=3,top_k=2",
                               costs=FixedCosts(FLAT), suffix=merged)
    gen.eos_ids = set()
    counts: dict[tuple[int, ...], int] = {}
    accepted = 0
    for call in range(3):
        for result in gen.generate_batch([prompt] * 500, max_new_tokens=4, temperature=1.0, seed=100 + call):
            counts[tuple(result.token_ids)] = counts.get(tuple(result.token_ids), 0) + 1
            accepted += sum(result.stats.accepted)
    assert accepted > 0
    exact = exact_joint(model, prompt, config, 4)
    assert chi_square_p_value([(exact, counts)]) > 1e-4


def test_load_generator_speculates_without_a_draft_model(monkeypatch):
    """`load_generator(draft="none")` loads no draft model and builds the suffix drafter (tiny model stand-in)."""
    import castspec.api as api

    model = tiny_model("qwen2", seed=2, sharpen=30.0)
    loaded = []
    monkeypatch.setattr(api, "load_model", lambda name, device="cpu": loaded.append(name) or (model, ToyTokenizer()))

    def profile_target_only(models, **kwargs):
        assert set(models) == {"target"}, "a draft model was profiled"
        return FLAT

    monkeypatch.setattr(api, "load_or_profile", profile_target_only)
    gen = api.load_generator("target-name", draft="none", policy="cast", fast_kernels=False)
    assert loaded == ["target-name"] and isinstance(gen.drafter, SuffixDrafter)
    assert gen.generate(REPEATING, max_new_tokens=8).token_ids == reference_greedy(model, REPEATING, 8)


@pytest.mark.parametrize("policy", ["chain:gamma=3", "cast", "cast:mode=paper"])
def test_draft_model_and_suffix_candidates_in_one_tree_are_exact(target, policy):
    draft = on_test_device(tiny_model("qwen2", seed=5, layers=1, sharpen=30.0))  # often wrong: suffix nodes help
    gen = SpeculativeGenerator(target, ToyTokenizer(), draft=draft, policy=policy, costs=OnlineCosts(FLAT),
                               suffix=True)
    results = gen.generate_batch(PROMPTS, max_new_tokens=20)
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result.token_ids == reference_greedy(target, prompt, 20), (policy, prompt)
    assert sum(sum(r.stats.accepted) for r in results) > 0
    if policy.startswith("cast"):  # verified draft-free nodes taught their own sources' calibration
        from castspec.policies.cast import Calibration

        learned = gen.policy.calibration.counts - Calibration().counts
        assert learned[0].sum() > 0 and learned[1:].sum() > 0
