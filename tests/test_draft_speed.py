"""A cheaper draft changes nothing the target decides: a reduced-vocabulary output head and fused projections.

- `reduce_draft_vocab`: the reduced head's logits are the full head's rows of the kept ids; the engine maps its
  columns back to token ids; a reduced draft never proposes an id outside the subset; greedy output equals the
  target's own, and sampled output follows the target's exact law (chi-square, the deep-tree machinery of
  tests/test_sampling.py, trees verified to depth 3) although the draft cannot propose tokens the target often draws.
- `fuse_projections`: q/k/v and gate/up as one matmul each give the same logits (bitwise in int8, as the draft runs
  them), also when members are called out of the usual pattern.
- `use_lean_layers`: Qwen2 and Llama layers computed with fewer torch calls give the stock layers' logits (float64;
  close in int8), drafting through the engine stays exact; unsupported layers (Gemma 3) stay stock.
- With the real pair (`real_models`): the default draft is reduced to ids < 65,536 + EOS, runs lean layers, never
  proposes other ids, and speculative output equals plain decoding.
- The option's plumbing: `$CASTSPEC_DRAFT_VOCAB`, CLI validation, a policy asking for more children than the
  reduced draft has, and the cost table's draft/target ratio.
"""

from __future__ import annotations

import copy

import pytest
import torch

from castspec.api import DRAFT_VOCAB_ENV, resolve_draft_vocab
from castspec.engine import SpeculativeGenerator
from castspec.errors import CastspecError
from castspec.models.draft_head import draft_vocab_ids, draft_vocab_size, reduce_draft_vocab
from castspec.models.fuse import FusedPart, fuse_projections, is_fused
from castspec.models.kernels import describe_kernels, quantize_draft_int8
from castspec.models.lean import LeanDecoderLayer, use_lean_layers
from castspec.models.runner import CausalLMRunner
from castspec.tree import DraftTree
from castspec.verify import SamplingConfig
from tests.conftest import VOCAB, ToyTokenizer, reference_greedy, tiny_model
from tests.test_cast import synthetic_table
from tests.test_sampling import (
    ALPHA,
    PROMPTS,
    SAMPLES,
    FixedCosts,
    chi_square_p_value,
    exact_joint,
    make_generator,
    sample,
    small_model,
)

KEEP = 40  # ids below this, plus EXTRA
EXTRA = 90


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def proposals(monkeypatch):
    """Every token id any draft tree holds during the test."""
    seen: set[int] = set()
    add_level = DraftTree.add_level

    def spy(self, tokens, *args, **kwargs):
        seen.update(tokens.reshape(-1).tolist())
        return add_level(self, tokens, *args, **kwargs)

    monkeypatch.setattr(DraftTree, "add_level", spy)
    return seen


def reduced(model, size=KEEP, keep=(EXTRA,)):
    model = copy.deepcopy(model)
    reduce_draft_vocab(model, size, keep=keep)
    return model


# --- the reduced head -------------------------------------------------------------------------------------------
def test_reduced_head_holds_the_kept_rows():
    full = tiny_model("qwen2", seed=3)
    small = reduced(full)
    ids = draft_vocab_ids(small)
    assert ids.tolist() == list(range(KEEP)) + [EXTRA] and draft_vocab_size(small) == KEEP + 1
    assert draft_vocab_ids(full) is None and draft_vocab_size(full) == VOCAB
    assert small.get_input_embeddings().weight.shape[0] == VOCAB  # any accepted token can still be fed
    prompt = torch.tensor([[5, 17, 93, 2]])  # 93: an id the reduced draft can read but never propose
    with torch.no_grad():
        torch.testing.assert_close(small(prompt).logits, full(prompt).logits[..., ids], rtol=1e-12, atol=1e-12)


def test_reduce_keeps_everything_for_zero_or_a_large_size():
    model = tiny_model("qwen2", seed=3)
    assert reduce_draft_vocab(model, 0) == VOCAB and draft_vocab_ids(model) is None
    assert reduce_draft_vocab(model, VOCAB + 5) == VOCAB and draft_vocab_ids(model) is None
    assert reduce_draft_vocab(model, 10, keep=[3, 50]) == 11  # 3 is below the size already
    with pytest.raises(CastspecError, match="already reduced"):
        reduce_draft_vocab(model, 5)


@pytest.mark.parametrize("policy", ["chain:gamma=4", "eagle2:total_tokens=12,depth=4,top_k=3",
                                    "static:paths=0;1;2;0.0;0.1;0.0.0"])
def test_reduced_draft_proposes_only_kept_ids_and_greedy_is_the_targets(proposals, policy):
    target = tiny_model("qwen2", seed=11, sharpen=4.0)
    draft = reduced(target)  # the target's own weights: a full head would propose ids >= KEEP all the time
    prompt = [5, 17, 33, 2, 61, 8]
    gen = SpeculativeGenerator(target, ToyTokenizer(), draft=draft, policy=policy)
    out = gen.generate(prompt, max_new_tokens=40)
    expected = reference_greedy(target, prompt, 40)
    assert out.token_ids == expected
    assert proposals and proposals <= set(range(KEEP)) | {EXTRA}
    assert any(t >= KEEP for t in expected)  # the target did emit ids the draft cannot propose
    assert sum(out.stats.accepted) > 0


def test_reduced_draft_with_cast_is_greedy_exact(proposals):
    target = tiny_model("qwen2", seed=11, sharpen=4.0)
    gen = SpeculativeGenerator(target, ToyTokenizer(), draft=reduced(target), policy="cast",
                               costs=FixedCosts(synthetic_table(lambda b, n: 100.0 + n, lambda b, n: 10.0 + 0.1 * n)))
    prompt = [9, 4, 71, 30]
    assert gen.generate(prompt, max_new_tokens=30).token_ids == reference_greedy(target, prompt, 30)
    assert proposals <= set(range(KEEP)) | {EXTRA}


@pytest.mark.parametrize("policy", ["chain:gamma=3", "cast:top_k=6"])
def test_reduced_draft_samples_the_target_law(proposals, policy):
    """Vocabulary 8, draft proposes ids 0..4 and 7 only: the law of 5 sampled tokens is still the target's."""
    target, draft = small_model(0, 20.0), small_model(0, 20.0, noise=0.4)
    reduce_draft_vocab(draft, 5, keep=[7])
    config = SamplingConfig(temperature=1.0)
    counts, stats = sample(make_generator(target, draft, policy), list(PROMPTS), config, SAMPLES, 5)
    assert proposals <= {0, 1, 2, 3, 4, 7}
    deep = {a for s in stats for d, a in zip(s.depths, s.accepted, strict=True) if d >= 3}
    assert {2, 3} <= deep and min(deep) < 3  # depth-3 trees verified, accepted at depth 2 and 3, and rejected
    emitted = {t for c in counts for key in c for t in key}
    assert emitted & {5, 6}  # tokens the draft can never propose were drawn
    exact = [exact_joint(target, p, config, 5) for p in PROMPTS]
    assert chi_square_p_value(list(zip(exact, counts, strict=True))) > ALPHA


def test_policy_asking_for_more_children_than_the_reduced_draft_has_is_refused():
    target = tiny_model("qwen2", seed=11)
    with pytest.raises(CastspecError, match="top_k=10"):
        SpeculativeGenerator(target, ToyTokenizer(), draft=reduced(target, 6, keep=()),
                             policy="eagle2:total_tokens=12,depth=2,top_k=10")


# --- fused projections ------------------------------------------------------------------------------------------
def test_fused_projections_give_the_same_logits_bitwise_in_int8():
    base = tiny_model("qwen2", seed=5).float()
    plain, fused = copy.deepcopy(base), copy.deepcopy(base)
    assert fuse_projections(fused) == 2 * base.config.num_hidden_layers and is_fused(fused)
    quantize_draft_int8(plain)
    quantize_draft_int8(fused)
    prompt = torch.tensor([[5, 17, 93, 2, 44, 61]])
    with torch.no_grad():
        assert torch.equal(plain(prompt).logits, fused(prompt).logits)


def test_fused_projections_float_and_through_the_engine():
    target = tiny_model("qwen2", seed=11, sharpen=4.0)
    draft = copy.deepcopy(target)
    fuse_projections(draft)
    prompt = torch.tensor([[5, 17, 33, 2]])
    with torch.no_grad():
        torch.testing.assert_close(draft(prompt).logits, target(prompt).logits, rtol=1e-12, atol=1e-12)
    gen = SpeculativeGenerator(target, ToyTokenizer(), draft=draft, policy="chain:gamma=4")
    out = gen.generate([5, 17, 33, 2], max_new_tokens=20)
    assert out.token_ids == reference_greedy(target, [5, 17, 33, 2], 20)
    assert sum(out.stats.accepted) > 0


def test_fused_members_called_out_of_pattern_stay_right():
    base = tiny_model("qwen2", seed=5)
    attn = base.model.layers[0].self_attn
    q, k, v = copy.deepcopy(attn.q_proj), copy.deepcopy(attn.k_proj), copy.deepcopy(attn.v_proj)
    fuse_projections(base)
    assert isinstance(attn.k_proj, FusedPart)
    x1, x2 = torch.randn(3, 32, dtype=torch.float64), torch.randn(3, 32, dtype=torch.float64)
    with torch.no_grad():
        checks = [(attn.q_proj(x1), q(x1)), (attn.k_proj(x2), k(x2)), (attn.k_proj(x2), k(x2)),
                  (attn.v_proj(x1), v(x1)), (attn.v_proj(x2), v(x2)), (attn.q_proj(x2), q(x2))]
    for got, want in checks:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# --- plumbing ---------------------------------------------------------------------------------------------------
def test_draft_vocab_from_argument_environment_or_default(monkeypatch):
    from castspec.api import DEFAULT_DRAFT_VOCAB

    monkeypatch.delenv(DRAFT_VOCAB_ENV, raising=False)
    assert resolve_draft_vocab(None) == DEFAULT_DRAFT_VOCAB
    assert resolve_draft_vocab(0) == 0 and resolve_draft_vocab(1000) == 1000
    monkeypatch.setenv(DRAFT_VOCAB_ENV, "32768")
    assert resolve_draft_vocab(None) == 32768 and resolve_draft_vocab(0) == 0
    monkeypatch.setenv(DRAFT_VOCAB_ENV, "many")
    with pytest.raises(CastspecError, match=DRAFT_VOCAB_ENV):
        resolve_draft_vocab(None)
    for bad in (-1, 2.5, True):
        with pytest.raises(CastspecError, match="draft_vocab"):
            resolve_draft_vocab(bad)


def test_cli_refuses_a_negative_draft_vocab(capsys):
    from castspec.cli import main

    assert main(["generate", "--draft-vocab", "-3", "--prompt", "x"]) == 2
    assert "--draft-vocab" in capsys.readouterr().err


def test_cost_table_reports_draft_over_target():
    table = synthetic_table(lambda b, n: 100.0 + n, lambda b, n: 20.0 + 2 * n)
    ratios = table.draft_ratios()
    first = [round((20.0 + 2 * n) / 101.0, 4) for n in table.tokens]
    assert ratios[0][0] == first and ratios[0][1] == first


# --- lean layers ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_lean_layers_compute_the_stock_layers(arch):
    stock = tiny_model(arch, seed=7, sharpen=4.0)
    lean = copy.deepcopy(stock)
    assert use_lean_layers(lean) == stock.config.num_hidden_layers
    assert all(isinstance(layer, LeanDecoderLayer) for layer in lean.model.layers)
    assert describe_kernels(lean).endswith("+lean")
    prompt = [5, 17, 33, 2, 61, 8]
    stock_runner = CausalLMRunner(stock, canonical=False)
    lean_runner = CausalLMRunner(lean, canonical=False)
    torch.testing.assert_close(lean_runner.prefill([prompt]), stock_runner.prefill([prompt]), rtol=1e-12,
                               atol=1e-12)
    gen = SpeculativeGenerator(stock, ToyTokenizer(), draft=lean, policy="eagle2:total_tokens=12,depth=4,top_k=3")
    out = gen.generate(prompt, max_new_tokens=30)
    assert out.token_ids == reference_greedy(stock, prompt, 30)
    assert out.stats.mean_accept_len > 2.0  # the same function: trees are mostly accepted


def test_lean_layers_in_int8_stay_close_to_stock_int8():
    base = tiny_model("qwen2", seed=5).float()
    stock, lean = copy.deepcopy(base), copy.deepcopy(base)
    use_lean_layers(lean)
    quantize_draft_int8(stock)
    quantize_draft_int8(lean)
    prompt = torch.tensor([[5, 17, 93, 2, 44, 61]])
    with torch.no_grad():
        torch.testing.assert_close(lean(prompt).logits, stock(prompt).logits, rtol=1e-4, atol=1e-4)


def test_unsupported_layers_stay_stock():
    model = tiny_model("gemma3", seed=5)  # query/key norms, sliding windows: not a lean layer's arithmetic
    assert use_lean_layers(model) == 0
    assert not any(isinstance(m, LeanDecoderLayer) for m in model.modules())


@pytest.mark.real_models
def test_real_pair_default_draft_is_reduced_lean_and_exact(proposals):
    from castspec import load_generator
    from castspec.policies import make_policy

    gen = load_generator("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", policy="chain:gamma=4")
    draft = gen.models["draft"]
    assert draft_vocab_size(draft) == 65536 + len(gen.eos_ids - set(range(65536)))
    # the draft follows the target's format (auto: q4k where it passed its check and measures fastest, else fp32)
    native = describe_kernels(gen.models["target"]).startswith("q4k")
    assert ("+native" if native else "+lean") in describe_kernels(draft)
    prompt = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    spec = gen.generate(prompt, max_new_tokens=24)
    gen.policy = make_policy("ar")
    assert spec.token_ids == gen.generate(prompt, max_new_tokens=24).token_ids
    assert spec.stats.mean_accept_len > 1.5
    assert all(t < 65536 or t in gen.eos_ids for t in proposals)
