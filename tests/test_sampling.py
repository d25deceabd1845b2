"""Sampling is lossless: the law of the generated tokens is exactly the target's, whatever tree is verified.

Every test compares seeded samples with an exact law by Pearson's chi-square test at a false-alarm rate of
ALPHA = 1e-4 per test; seeds and cost tables are fixed, so every run draws the same samples.

- Deep trees, `test_deep_trees_sample_the_target_law`: the exact joint law of the first 5 generated tokens of a
  target with an 8-token vocabulary (8^5 outcomes, enumerated with the target and `TokenChooser.probabilities`),
  for `ar` (the control), `chain:gamma=3`, a static tree with a depth-3 path plus siblings, EAGLE-2 with 3 levels
  and CAST in `auto` and `paper` mode; at temperature 1, and at temperature 1.2 with top-k 4 and top-p 0.9. The
  first token comes from the prefill, so the first step has 4 tokens to go and drafts up to depth 3: accepting a
  node of depth 2 or 3 from the target's draw at its parent is checked. Each test (but `ar`'s) asserts that trees
  of depth >= 3 were verified, that steps verifying them accepted nodes of depth 2 and of depth 3, and that some
  of them stopped short (a rejection), so it cannot silently become shallow. The draft is a perturbed copy of the
  target (noise on its output head): it agrees enough for deep acceptances and differs enough for rejections at
  every depth. 3000 samples per test, in calls of 1000 rows, in two batch compositions: `alone`, every row the
  same prompt (each row a sequence decoded on its own; rows that accept differently share each step), and `pair`,
  rows alternating two different prompts of different lengths (so left padding differs too), each prompt's
  samples checked against its own exact law (one chi-square statistic over both). A literal batch of one row per
  call is not sampled: too slow for this budget.
- Wrong verifiers are caught by the same machinery: one that accepts every drafted token, and two that are exact
  at depth 1 and wrong only at depth >= 2 (one accepts a node whenever its parent was accepted; one credits a draw
  of a later sibling to the first sibling). These two never differ from the true verifier on trees at most 1 deep,
  so only a deep test can catch them.
- Shallow, `test_short_samples_follow_the_target_law`: the joint law of 3 tokens over a 16-token vocabulary (trees
  at most 1 deep; the draft is the target itself) for `ar`, `chain:gamma=2`, EAGLE-2 and CAST auto, at a third
  setting (temperature 1.3, top-p 0.8), from batches of copies of one prompt.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

import castspec.engine as engine
from castspec.cost.table import OnlineCosts
from castspec.engine import SpeculativeGenerator
from castspec.verify import SamplingConfig, TokenChooser
from castspec.verify import verify as true_verify
from tests.conftest import ToyTokenizer
from tests.test_cast import synthetic_table

ALPHA = 1e-4
VOCAB = 8
PROMPTS = ([5, 7, 1], [3, 3, 2, 7, 1])
NEW_TOKENS = 5  # the prefill's token, then a first step that drafts up to depth NEW_TOKENS - 2 = 3
SAMPLES, BATCH = 3000, 1000  # per test; rows per generate_batch call
COMPOSITIONS = {"alone": (0,), "pair": (0, 1)}  # which prompts the rows of each call cycle through


def small_model(seed: int, sharpen: float, noise: float = 0.0, vocab: int = VOCAB):
    """A tiny float64 model; `noise` perturbs its output head (relative to the head's spread), seeded by seed + 1."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=0, eos_token_id=None, pad_token_id=0, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float64, attn_implementation="sdpa").eval()
    with torch.no_grad():
        head = model.lm_head.weight
        if noise:
            gen = torch.Generator().manual_seed(seed + 1)
            head.add_(noise * head.std() * torch.randn(head.shape, generator=gen, dtype=head.dtype))
        head.mul_(sharpen)
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second thread only adds synchronisation (and is much slower on a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    return small_model(0, 20.0), small_model(0, 20.0, noise=0.4)


class FixedCosts(OnlineCosts):
    """The table's costs, never rescaled by measured times: CAST's trees (so the draws) depend on the seed only."""

    def observe(self, role: str, predicted_ms: float, measured_ms: float) -> None:
        pass


# A draft level costs 10% of a target forward and each verified node 1% (FLAT in tests/test_cast.py, with a 5x
# steeper verify slope): CAST's trees reach depth 3 in both modes with ~20 verified nodes (under FLAT itself they
# also reach depth 3, with ~50 nodes: slower to run). Seconds rather than ms, so that CAST auto's plain-decoding
# fallback (the measured rate against the table's plain rate) can never trigger.
DEEP_TABLE = synthetic_table(lambda b, n: 1000 * (100.0 + 1.0 * n), lambda b, n: 1000 * (10.0 + 0.05 * n))


def make_generator(target, draft, policy: str) -> SpeculativeGenerator:
    gen = SpeculativeGenerator(target, ToyTokenizer(), draft=draft, policy=policy, costs=FixedCosts(DEEP_TABLE))
    gen.eos_ids = set()  # the toy tokenizer's EOS id is an ordinary token here
    return gen


def exact_joint(model, prompt: list[int], config: SamplingConfig, length: int) -> dict[tuple[int, ...], float]:
    """P(first `length` tokens) under plain sampling from `model`, by enumeration (one forward per length)."""
    chooser = TokenChooser(config)
    seqs, probs = [()], torch.ones(1, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(length):
            logits = model(torch.tensor([prompt + list(s) for s in seqs])).logits[:, -1]
            joint = probs[:, None] * chooser.probabilities(logits).double()
            seqs = [seqs[i] + (t,) for i, t in joint.nonzero().tolist()]
            probs = joint[joint > 0]
    return dict(zip(seqs, probs.tolist(), strict=True))


def sample(gen, prompts: list[list[int]], config: SamplingConfig, samples: int, new_tokens: int, seed: int = 17):
    """Counts of each prompt's outcomes over `samples` rows (`BATCH` rows per call cycling through `prompts`), and
    every row's stats."""
    counts: list[dict[tuple[int, ...], int]] = [{} for _ in prompts]
    stats = []
    rows = prompts * (BATCH // len(prompts))
    for call in range(samples // BATCH):
        results = gen.generate_batch(rows, max_new_tokens=new_tokens, temperature=config.temperature,
                                     top_k=config.top_k, top_p=config.top_p, seed=seed + 1000 * call)
        for i, r in enumerate(results):
            key = tuple(r.token_ids)
            counts[i % len(prompts)][key] = counts[i % len(prompts)].get(key, 0) + 1
            stats.append(r.stats)
    return counts, stats


def chi_square_p_value(groups: list[tuple[dict, dict]]) -> float:
    """Pearson's test of independent samples, each (exact law, counts), against their laws: one statistic summed
    over the groups; in each, outcomes of expected count < 5 are pooled into one bin (Wilson-Hilferty p-value)."""
    stat, dof = 0.0, 0
    for exact, counts in groups:
        total = sum(counts.values())
        pooled_e, pooled_o, bins = 0.0, 0, 0
        for key in set(exact) | set(counts):
            expected, observed = exact.get(key, 0.0) * total, counts.get(key, 0)
            if expected < 5:
                pooled_e += expected
                pooled_o += observed
                continue
            stat += (observed - expected) ** 2 / expected
            bins += 1
        if pooled_e > 0:
            stat += (pooled_o - pooled_e) ** 2 / pooled_e
            bins += 1
        elif pooled_o > 0:
            return 0.0  # outcomes the target can never produce
        dof += bins - 1
    k = max(dof, 1)
    z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


@pytest.fixture(scope="module")
def target_law(models):
    """The exact law of a prompt's first NEW_TOKENS tokens under a sampling setting, computed once per module."""
    cache: dict[tuple, dict[tuple[int, ...], float]] = {}

    def law(prompt: list[int], config: SamplingConfig) -> dict[tuple[int, ...], float]:
        key = (tuple(prompt), config)
        if key not in cache:
            cache[key] = exact_joint(models[0], prompt, config, NEW_TOKENS)
        return cache[key]

    return law


def deep_p_value(models, target_law, policy: str, config: SamplingConfig, composition: str = "alone",
                 exact_verifier: bool = True) -> float:
    """Sample NEW_TOKENS tokens with `policy`, check the trees went deep, return the chi-square p-value."""
    target, draft = models
    prompts = [PROMPTS[i] for i in COMPOSITIONS[composition]]
    counts, stats = sample(make_generator(target, draft, policy), prompts, config, SAMPLES, NEW_TOKENS)
    if policy != "ar":
        deep = {a for s in stats for d, a in zip(s.depths, s.accepted, strict=True) if d >= 3}  # accepted counts
        assert deep, "no tree of depth >= 3 was verified"
        if exact_verifier:
            assert {2, 3} <= deep and min(deep) < 3, f"steps of depth >= 3 accepted {sorted(deep)} drafted tokens"
    exact = [target_law(p, config) for p in prompts]
    return chi_square_p_value(list(zip(exact, counts, strict=True)))


DEEP_SETTINGS = [SamplingConfig(temperature=1.0), SamplingConfig(temperature=1.2, top_k=4, top_p=0.9)]
DEEP_POLICIES = ["ar", "chain:gamma=3", "static:paths=0;1;0.0;0.1;1.0;0.0.0", "eagle2:total_tokens=10,depth=2,top_k=3",
                 "cast", "cast:mode=paper"]


def setting_id(c: SamplingConfig) -> str:
    return f"T{c.temperature}-k{c.top_k}-p{c.top_p}"


@pytest.mark.parametrize("composition", list(COMPOSITIONS))
@pytest.mark.parametrize("policy", DEEP_POLICIES)
@pytest.mark.parametrize("config", DEEP_SETTINGS, ids=setting_id)
def test_deep_trees_sample_the_target_law(models, target_law, policy, config, composition):
    assert deep_p_value(models, target_law, policy, config, composition) > ALPHA


def accept_everything(tree, target_next):
    """Wrong: pretends the target chose every drafted child (the draft's law, not the target's)."""
    forced = target_next.clone()
    forced.scatter_(1, tree.parent_pos + 1, tree.tokens)
    return true_verify(tree, forced)


def accept_deep_after_parent(tree, target_next):
    """Wrong only at depth >= 2: once a depth >= 1 node is accepted, its first child is accepted whatever the
    target drew there (the draw at the parent is replaced by that child's token). Depth-1 nodes are judged exactly."""
    forced = target_next.clone()
    for j in reversed(range(tree.size)):  # reversed: a parent's first child is written last
        deep = tree.depth[:, j] >= 2
        slot = tree.parent_pos[:, j] + 1
        current = forced.gather(1, slot[:, None])[:, 0]
        forced.scatter_(1, slot[:, None], torch.where(deep, tree.tokens[:, j], current)[:, None])
    return true_verify(tree, forced)


def credit_later_sibling_to_first(tree, target_next):
    """Wrong only at depth >= 2: when the target's draw at a node of depth >= 1 is the token of one of that node's
    drafted children other than the first, the first child is accepted instead. Depth-1 nodes are judged exactly."""
    forced = target_next.clone()
    position = torch.arange(tree.size)
    for j in range(tree.size):
        sibling = tree.parent_pos == tree.parent_pos[:, j:j + 1]  # [B, M], j's siblings and j itself
        first = ~(sibling & (position < j)).any(dim=1)
        slot = tree.parent_pos[:, j:j + 1] + 1
        drawn = target_next.gather(1, slot)
        later_drawn = (sibling & (position > j) & (tree.tokens == drawn)).any(dim=1)
        hit = (tree.depth[:, j] >= 2) & first & later_drawn
        forced.scatter_(1, slot, torch.where(hit, tree.tokens[:, j], forced.gather(1, slot)[:, 0])[:, None])
    return true_verify(tree, forced)


@pytest.mark.parametrize(("wrong", "policy"), [(accept_everything, "chain:gamma=3"),
                                               (accept_deep_after_parent, "chain:gamma=3"),
                                               (credit_later_sibling_to_first, DEEP_POLICIES[2])],
                         ids=lambda v: getattr(v, "__name__", v))
def test_wrong_verifiers_are_caught(models, target_law, monkeypatch, wrong, policy):
    """The deep test fails a verifier that is wrong anywhere, even wrong only at depth >= 2."""
    monkeypatch.setattr(engine, "verify", wrong)
    assert deep_p_value(models, target_law, policy, DEEP_SETTINGS[0], exact_verifier=False) < ALPHA


# --- three tokens, 16-token vocabulary: trees at most 1 deep ----------------------------------------------------
SHORT_SETTING = SamplingConfig(temperature=1.3, top_p=0.8)


@pytest.mark.parametrize("after_steps", [0, 2], ids=["bought-at-once", "bought-after-two-steps"])
def test_a_lazy_draft_samples_the_target_law(models, target_law, after_steps):
    """Steps from repeats alone (point-mass proposals), the draft model's prefill between steps, then its trees:
    the law of the output is still exactly the target's (CAST auto, both batch compositions' prompts)."""
    target, draft = models
    gen = SpeculativeGenerator(target, ToyTokenizer(), draft=draft, policy="cast", costs=FixedCosts(DEEP_TABLE),
                               lazy_draft=True)
    gen.eos_ids = set()
    lazy = gen.drafter
    lazy.threshold_ms = lambda contexts: 0.0 if lazy.steps + 1 >= after_steps else float("inf")  # steps: timed
    config = DEEP_SETTINGS[0]
    counts, _ = sample(gen, list(PROMPTS), config, SAMPLES, NEW_TOKENS)
    assert gen.drafter.bought  # the last call bought it (each call is a new batch that decides afresh)
    exact = [target_law(p, config) for p in PROMPTS]
    assert chi_square_p_value(list(zip(exact, counts, strict=True))) > ALPHA


@pytest.fixture(scope="module")
def short_models():
    # The target's own weights as the draft: its top-k children hold most of the target's mass, so many steps
    # accept one or two drafted tokens and many reject.
    return small_model(0, 60.0, vocab=16), small_model(0, 60.0, vocab=16)


@pytest.mark.parametrize("policy", ["ar", "chain:gamma=2", "eagle2:total_tokens=8,depth=2,top_k=3", "cast"])
def test_short_samples_follow_the_target_law(short_models, policy):
    target, draft = short_models
    prompt = [3, 7, 1]
    counts, _ = sample(make_generator(target, draft, policy), [prompt], SHORT_SETTING, 6000, 3)
    assert chi_square_p_value([(exact_joint(target, prompt, SHORT_SETTING, 3), counts[0])]) > ALPHA


def test_same_seed_same_output(models):
    gen = make_generator(*models, "eagle2:total_tokens=8,depth=2,top_k=3")
    first = gen.generate(PROMPTS[0], max_new_tokens=12, temperature=1.0, seed=5).token_ids
    again = gen.generate(PROMPTS[0], max_new_tokens=12, temperature=1.0, seed=5).token_ids
    assert first == again


def test_exact_joint_sums_to_one(models):
    for config in DEEP_SETTINGS:
        joint = exact_joint(models[0], PROMPTS[1], config, NEW_TOKENS)
        assert sum(joint.values()) == pytest.approx(1.0)
        assert all(len(k) == NEW_TOKENS for k in joint)
