"""Sampling is lossless: the distribution of generated tokens is exactly the target's, for every policy.

A tiny model with a 16-token vocabulary makes the exact joint distribution of the first three generated tokens
computable (16^3 outcomes). Many seeded samples (a batch of copies of one prompt per call) are compared with it by
a chi-square test at a false-alarm rate of 1e-4 per test; with fixed seeds every run is deterministic. A deliberately
wrong verifier that accepts every drafted token is caught by the same test.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from castspec.cost.table import OnlineCosts
from castspec.engine import SpeculativeGenerator
from castspec.verify import SamplingConfig, TokenChooser
from tests.conftest import ToyTokenizer
from tests.test_cast import FLAT

VOCAB, PROMPT, SAMPLES, BATCH = 16, [3, 7, 1], 6000, 1000
ALPHA = 1e-4


def small_model(seed: int, sharpen: float):
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=0, eos_token_id=None, pad_token_id=0, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float64, attn_implementation="sdpa").eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    return model


@pytest.fixture(scope="module")
def models():
    # The target's own weights as the draft: its top-k children hold most of the target's mass, so many steps
    # accept one or two drafted tokens and many reject — both halves of the verifier are exercised.
    return small_model(0, 60.0), small_model(0, 60.0)


def exact_joint(model, config: SamplingConfig, length: int = 3) -> dict[tuple[int, ...], float]:
    chooser = TokenChooser(config)
    probs = {(): 1.0}
    with torch.no_grad():
        for _ in range(length):
            nxt = {}
            for seq, p in probs.items():
                logits = model(torch.tensor([PROMPT + list(seq)])).logits[0, -1]
                dist = chooser.probabilities(logits)
                for token in range(VOCAB):
                    if dist[token] > 0:
                        nxt[seq + (token,)] = p * float(dist[token])
            probs = nxt
    return probs


def sample_joint(gen, config: SamplingConfig) -> dict[tuple[int, ...], int]:
    gen.eos_ids = set()  # the toy tokenizer's EOS id is an ordinary token here
    counts: dict[tuple[int, ...], int] = {}
    for call in range(SAMPLES // BATCH):
        results = gen.generate_batch([PROMPT] * BATCH, max_new_tokens=3, temperature=config.temperature,
                                     top_k=config.top_k, top_p=config.top_p, seed=1000 * call + 17)
        for r in results:
            key = tuple(r.token_ids)
            counts[key] = counts.get(key, 0) + 1
    return counts


def chi_square_p_value(exact: dict, counts: dict) -> float:
    """Pearson's test with outcomes of expected count < 5 pooled into one bin (Wilson-Hilferty p-value)."""
    total = sum(counts.values())
    stat, dof, pooled_e, pooled_o = 0.0, -1, 0.0, 0
    for key in set(exact) | set(counts):
        expected, observed = exact.get(key, 0.0) * total, counts.get(key, 0)
        if expected < 5:
            pooled_e += expected
            pooled_o += observed
            continue
        stat += (observed - expected) ** 2 / expected
        dof += 1
    if pooled_e > 0:
        stat += (pooled_o - pooled_e) ** 2 / pooled_e
        dof += 1
    elif pooled_o > 0:
        return 0.0  # tokens the target can never produce
    k = max(dof, 1)
    z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


SETTINGS = [SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.7, top_k=5),
            SamplingConfig(temperature=1.3, top_p=0.8)]
POLICIES = ["ar", "chain:gamma=2", "static:paths=0;1;0.0;0.1;1.0", "eagle2:total_tokens=8,depth=2,top_k=3", "cast"]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("config", SETTINGS, ids=lambda c: f"T{c.temperature}-k{c.top_k}-p{c.top_p}")
def test_sampled_tokens_follow_the_target_distribution(models, policy, config):
    target, draft = models
    gen = SpeculativeGenerator(target, ToyTokenizer(), draft=draft, policy=policy, costs=OnlineCosts(FLAT))
    counts = sample_joint(gen, config)
    assert chi_square_p_value(exact_joint(target, config), counts) > ALPHA


def test_a_wrong_verifier_is_caught(models, monkeypatch):
    """Accepting every drafted token gives the draft's distribution, not the target's: the test must fail it."""
    import castspec.engine as engine
    from castspec.verify import verify as real_verify

    def accept_everything(tree, target_next):
        forced = target_next.clone()
        parent_slot = tree.parent_pos + 1
        forced.scatter_(1, parent_slot, tree.tokens)  # pretend the target chose each drafted child
        return real_verify(tree, forced)

    monkeypatch.setattr(engine, "verify", accept_everything)
    target, draft = models
    gen = SpeculativeGenerator(target, ToyTokenizer(), draft=draft, policy="chain:gamma=2")
    config = SETTINGS[0]
    assert chi_square_p_value(exact_joint(target, config), sample_joint(gen, config)) < ALPHA


def test_same_seed_same_output(models):
    target, draft = models
    gen = SpeculativeGenerator(target, ToyTokenizer(), draft=draft, policy="eagle2:total_tokens=8,depth=2,top_k=3")
    first = gen.generate(PROMPT, max_new_tokens=12, temperature=1.0, seed=5).token_ids
    again = gen.generate(PROMPT, max_new_tokens=12, temperature=1.0, seed=5).token_ids
    assert first == again


def test_exact_joint_sums_to_one(models):
    joint = exact_joint(models[0], SETTINGS[1])
    assert sum(joint.values()) == pytest.approx(1.0)
    assert all(len(k) == 3 for k in itertools.islice(joint, 5))
