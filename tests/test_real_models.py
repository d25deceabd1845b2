"""End to end with the real packaged models (converted once from their PyPI chunk packages, then cached)."""

from __future__ import annotations

import pytest

from castspec import load_generator
from castspec.policies import make_policy

pytestmark = pytest.mark.real_models

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def test_qwen_pair_matches_plain_decoding():
    gen = load_generator("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", policy="static")
    spec = gen.generate(PROMPT, max_new_tokens=16)
    gen.policy = make_policy("ar")
    plain = gen.generate(PROMPT, max_new_tokens=16)
    assert spec.token_ids == plain.token_ids
    assert spec.stats.steps < plain.stats.steps  # the draft did get tokens accepted
    assert "fib" in spec.text or "return" in spec.text or "if" in spec.text


def test_smollm_drafts_for_itself():
    gen = load_generator("smollm2-135m", "smollm2-135m", policy="chain:gamma=3", draft_quant="none")
    spec = gen.generate("The capital of France is", max_new_tokens=12)
    gen.policy = make_policy("ar")
    plain = gen.generate("The capital of France is", max_new_tokens=12)
    assert spec.token_ids == plain.token_ids
    assert "Paris" in spec.text
    assert spec.stats.mean_accept_len > 2.0  # the same weights (fp32 either side) agree almost always


def test_bench_quick_writes_complete_results(tmp_path):
    import json

    from castspec.cli import main

    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["records"]) == 2 and results["complete"]
    summary = results["summary"]
    assert set(summary) == {"ar", "hf", "chain:gamma=4", "eagle2:total_tokens=16,depth=4,top_k=4", "cast"}
    for method, entry in summary.items():
        assert entry["failed"] == [], method
        assert entry["tokens_per_s"] > 0
        assert "speedup_vs_ar" in entry and "speedup_vs_hf" in entry
    assert summary["chain:gamma=4"]["mean_accept_len"] > 1.0
    assert (tmp_path / "results.md").read_text().count("|") > 20
    assert (tmp_path / "speedup.png").stat().st_size > 1000
    assert (tmp_path / "accept_hist.png").stat().st_size > 1000


@pytest.mark.parametrize("dtype", ["int8", "q4k"])
def test_qwen_quantized_target_is_exact_to_itself(dtype):
    """A quantized target format: speculative output equals that format's plain decoding (int8 did not, before
    attention became canonical: 7 of 8 HumanEval completions left it). q4k runs the GGUF's own blocks."""
    from castspec.models.kernels import describe_kernels

    gen = load_generator("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", policy="cast", target_dtype=dtype)
    assert describe_kernels(gen.target.model).startswith({"int8": "int8-rows", "q4k": "q4k"}[dtype])
    spec = gen.generate(PROMPT, max_new_tokens=48)
    gen.policy = make_policy("ar")
    plain = gen.generate(PROMPT, max_new_tokens=48)
    assert spec.token_ids == plain.token_ids
    assert spec.stats.steps < plain.stats.steps
