"""The lazy draft model (`castspec.drafters.lazy`): bought only once the steps it could have shortened have cost as
much as its predicted prefill. Output stays exactly plain decoding's whenever (and whether) it is bought, its cache
then holds exactly the sequence so far, and its prefill is counted as prefill time, not as a step's."""

from __future__ import annotations

import pytest

from castspec.cost.table import OnlineCosts
from castspec.drafters.lazy import LazyDraft
from castspec.engine import SpeculativeGenerator
from tests.conftest import ToyTokenizer, on_test_device, reference_greedy, tiny_model
from tests.test_cast import FLAT
from tests.test_target_only import PROMPTS

NEVER, AT_ONCE = float("inf"), 0.0


@pytest.fixture(scope="module")
def pair():
    return (on_test_device(tiny_model("qwen2", seed=2, sharpen=30.0)),
            on_test_device(tiny_model("qwen2", seed=5, layers=1, sharpen=30.0)))


def lazy_generator(pair, policy: str, prefill_ms: float) -> SpeculativeGenerator:
    target, draft = pair
    gen = SpeculativeGenerator(target, ToyTokenizer(), draft=draft, policy=policy, costs=OnlineCosts(FLAT),
                               lazy_draft=True)
    assert isinstance(gen.drafter, LazyDraft)
    gen.drafter.prefill_ms = lambda rows, tokens: prefill_ms
    return gen


def draft_calls(pair) -> list[int]:
    calls = [0]
    pair[1].register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("policy", ["chain:gamma=3", "cast", "cast:mode=paper"])
@pytest.mark.parametrize("price", [NEVER, AT_ONCE, 1e-3], ids=["never-bought", "bought-at-once", "bought-later"])
def test_output_is_exact_whenever_the_draft_is_bought(pair, policy, price):
    gen = lazy_generator(pair, policy, price)
    results = gen.generate_batch(PROMPTS, max_new_tokens=20)
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result.token_ids == reference_greedy(pair[0], prompt, 20), (policy, prompt)
    if price in (NEVER, AT_ONCE):
        assert gen.drafter.bought == (price == AT_ONCE)


def test_a_draft_never_bought_is_never_run(pair):
    gen = lazy_generator(pair, "cast", NEVER)
    calls = draft_calls(pair)
    gen.generate(PROMPTS[1], max_new_tokens=12)
    assert calls[0] == 0 and gen.drafter.free


def test_the_draft_is_bought_after_the_regret_reaches_its_price_and_then_holds_the_whole_sequence(pair):
    """Bought mid-answer: prefilled on prompt + output so far; afterwards its cache plus pending tokens are exactly
    the sequence, step after step; a fresh batch starts without it again."""
    gen = lazy_generator(pair, "chain:gamma=3", 1e-3)
    lazy = gen.drafter
    seen = []

    def after_step(record, observe=gen.policy.observe):
        observe(record)
        if lazy.bought:
            known = gen.target.cache.length + 1  # committed tokens + the new root
            seen.append((lazy.lm.runner.cache.length + lazy.lm.pending_valid.sum(dim=1)).tolist() == known.tolist())
        else:
            seen.append(None)

    gen.policy.observe = after_step
    prompt = [11, 12, 13]  # never repeats within 24 tokens here: every step is regret
    out = gen.generate(prompt, max_new_tokens=24)
    assert out.token_ids == reference_greedy(pair[0], prompt, 24)
    assert seen[0] is None and seen[-1] is True and all(s in (None, True) for s in seen)
    assert lazy.bought
    gen.generate(prompt, max_new_tokens=1)  # a new batch: not bought until it pays again
    assert not lazy.bought


def test_the_first_step_after_the_prefill_counts_too(pair):
    """A batch's first step is timed from the end of its prefill: the text alone shortened nothing there either, so
    it adds to the regret (it was left out, which bought the draft one plain step late on short prompts)."""
    gen = lazy_generator(pair, "chain:gamma=3", NEVER)
    gen.generate([11, 12, 13], max_new_tokens=2)  # the prefill's token, then one step
    lazy = gen.drafter
    assert lazy.steps == 1 and lazy.steps_ms > 0 and lazy.regret_ms == lazy.steps_ms


def test_buying_counts_as_prefill_time_not_as_a_step(pair, monkeypatch):
    """The engine's clock (faked: it moves only while the draft model is prefilled, by 100 s) puts the purchase in
    prefill time; no step's draft or verify time contains it."""
    from types import SimpleNamespace

    import castspec.engine

    gen = lazy_generator(pair, "chain:gamma=3", AT_ONCE)
    clock = [0.0]
    monkeypatch.setattr(castspec.engine, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    lm_prefill = gen.drafter.lm.prefill

    def costly_prefill(*args, **kwargs):
        clock[0] += 100.0
        return lm_prefill(*args, **kwargs)

    monkeypatch.setattr(gen.drafter.lm, "prefill", costly_prefill)
    result = gen.generate(PROMPTS[0], max_new_tokens=6)
    assert gen.drafter.bought
    assert result.stats.prefill_s == result.batch_stats.prefill_s == 100.0
    assert result.stats.draft_s == result.stats.verify_s == 0.0


def test_the_price_comes_from_the_draft_cost_table(pair):
    """Without a table a lazy draft is bought at once (nothing to weigh); with one, its per-token prefill cost
    grows with the context and the rows."""
    target, draft = pair
    gen = SpeculativeGenerator(target, ToyTokenizer(), draft=draft, policy="chain", lazy_draft=True)
    assert gen.drafter.prefill_ms(1, 500) == 0.0
    gen = SpeculativeGenerator(target, ToyTokenizer(), draft=draft, policy="cast", costs=OnlineCosts(FLAT),
                               lazy_draft=True)
    one = gen.drafter.prefill_ms(1, 100)
    assert one > 0 and gen.drafter.prefill_ms(2, 100) == pytest.approx(2 * one)
    assert gen.drafter.prefill_ms(1, 400) > 3 * one


def test_a_price_small_beside_the_budget_lowers_the_threshold_a_large_one_does_not(pair):
    """Plain ski rental buys at regret = price; with the remaining budget's upside (remaining tokens x measured step
    time x DRAFT_SAVES) the larger, the threshold is price * price / upside; with no timed step yet, the price."""
    from castspec.drafters.lazy import DRAFT_SAVES

    gen = lazy_generator(pair, "cast", 100.0)
    lazy = gen.drafter
    lazy.budget, lazy.suffix.prompt_lens = 128, [10]
    context = [[3] * 12]  # 2 tokens generated: 126 remain
    assert lazy.threshold_ms(context) == 100.0  # no step timed yet
    lazy.steps, lazy.steps_ms = 4, 200.0  # 50 ms per step
    upside = 126 * 50.0 * DRAFT_SAVES
    assert lazy.threshold_ms(context) == pytest.approx(100.0 * 100.0 / upside)
    lazy.prefill_ms = lambda rows, tokens: 5000.0  # dearer than the upside: plain ski rental
    assert lazy.threshold_ms(context) == 5000.0
    lazy.prefill_ms, lazy.budget = (lambda rows, tokens: 100.0), 2  # cheap, but nothing left to gain
    assert lazy.threshold_ms(context) == 100.0


def test_the_price_follows_the_measured_target_prefill(pair, monkeypatch):
    """Once a prefill was measured, the price is the target's measured ms per prompt token times the table's
    draft/target ratio (the table's own per-token figure counts logits at every token; a prefill needs the last)."""
    from types import SimpleNamespace

    import castspec.engine

    target, draft = pair
    gen = SpeculativeGenerator(target, ToyTokenizer(), draft=draft, policy="cast", costs=OnlineCosts(FLAT),
                               lazy_draft=True)
    clock = [0.0]
    monkeypatch.setattr(castspec.engine, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    add_rows = gen.target.add_rows

    def timed_add_rows(prompts, *args, **kwargs):
        clock[0] += 0.002 * sum(map(len, prompts))  # 2 ms per prompt token
        return add_rows(prompts, *args, **kwargs)

    monkeypatch.setattr(gen.target, "add_rows", timed_add_rows)
    gen.generate(PROMPTS[0], max_new_tokens=2)
    widest = max(FLAT.tokens)
    ratio = (10.0 + 0.05 * widest) / (100.0 + 0.2 * widest)  # FLAT's draft and target costs at its widest block
    assert gen.drafter.prefill_ms(1, 100) == pytest.approx(2.0 * ratio * 100)
    assert gen.drafter.prefill_ms(3, 100) == pytest.approx(3 * 2.0 * ratio * 100)


def test_lazy_is_the_default_where_its_price_can_be_weighed():
    """`load_generator`'s (and so the CLI's and the server's) default: lazy under a cost-aware policy unless the
    caller merges repeats into every tree or windows the draft's prefill; an explicit choice always wins."""
    from castspec.api import resolve_lazy_draft
    from castspec.cli import build_parser
    from castspec.policies import make_policy

    cast, chain = make_policy("cast"), make_policy("chain")
    assert resolve_lazy_draft(None, cast, suffix=False, draft_window=0)
    assert not resolve_lazy_draft(None, chain, suffix=False, draft_window=0)
    assert not resolve_lazy_draft(None, cast, suffix=True, draft_window=0)
    assert not resolve_lazy_draft(None, cast, suffix=False, draft_window=64)
    assert not resolve_lazy_draft(False, cast, suffix=False, draft_window=0)
    assert resolve_lazy_draft(True, chain, suffix=False, draft_window=0)
    parse = build_parser().parse_args
    assert parse(["generate", "--prompt", "x"]).lazy_draft is None
    assert parse(["generate", "--prompt", "x", "--no-lazy-draft"]).lazy_draft is False
    assert parse(["serve", "--lazy-draft"]).lazy_draft is True
