"""Benchmark prompt sets: deterministic choice, Spec-Bench categories, and clear errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from castspec.bench.datasets import load_prompts
from castspec.bench.runner import summarize
from castspec.errors import CastspecError

SPEC_BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "question.jsonl"


def test_humaneval_choice_is_seeded():
    first = load_prompts("humaneval", 8, seed=0)
    assert len(first) == 8 and all(p.id.startswith("HumanEval/") and not p.chat for p in first)
    assert [p.id for p in first] == [p.id for p in load_prompts("humaneval", 8, seed=0)]
    assert [p.id for p in first] != [p.id for p in load_prompts("humaneval", 8, seed=1)]


@pytest.mark.skipif(not SPEC_BENCH.is_file(), reason="shared Spec-Bench copy not present")
def test_spec_bench_tasks():
    mt = load_prompts(f"spec-bench:{SPEC_BENCH}:mt-bench", 8)
    assert len(mt) == 8 and all(p.chat and len(p.turns) == 2 for p in mt)
    both = load_prompts(f"spec-bench:{SPEC_BENCH}:gsm8k,cnn-dm", 3)
    assert [p.task for p in both] == ["gsm8k"] * 3 + ["cnn-dm"] * 3
    assert len(load_prompts(f"spec-bench:{SPEC_BENCH}", 2)) == 2  # default task: mt-bench


@pytest.mark.parametrize("dataset, message", [
    ("alpaca", "unknown dataset"),
    ("spec-bench:/nonexistent/q.jsonl:mt-bench", "not found"),
])
def test_bad_dataset(dataset, message):
    with pytest.raises(CastspecError, match=message):
        load_prompts(dataset, 4)


def test_malformed_lines_and_unknown_tasks(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question_id": 1, "category": "qa", "turns": ["hi"]}\n{"category": "qa"\n')
    with pytest.raises(CastspecError, match=r"q.jsonl:2"):
        load_prompts(f"spec-bench:{path}:qa", 4)
    path.write_text('{"question_id": 1, "category": "qa", "turns": ["hi"]}\n')
    with pytest.raises(CastspecError, match="unknown Spec-Bench task"):
        load_prompts(f"spec-bench:{path}:poetry", 4)
    assert len(load_prompts(f"spec-bench:{path}:natural-questions", 4)) == 1


def test_summary_reports_failures_and_ratios():
    ok = {"token_ids": [[1, 2]], "new_tokens": 2, "wall_s": 1.0, "steps": 1, "accepted": [1], "depths": [2],
          "verified": [3], "draft_s": 0.2, "verify_s": 0.7, "identical_to_ar": [True]}
    records = [{"group": "a", "prompts": ["a"], "methods": {"ar": {"token_ids": [[1, 2]], "new_tokens": 2,
                                                                   "wall_s": 2.0}, "chain": ok}},
               {"group": "b", "prompts": ["b"], "methods": {"ar": {"token_ids": [[1]], "new_tokens": 1, "wall_s": 1.0},
                                                            "chain": {"error": "RuntimeError: boom"}}}]
    summary = summarize(records, ["ar", "chain"])
    assert summary["chain"]["failed"] == [{"group": "b", "error": "RuntimeError: boom"}]
    assert summary["chain"]["speedup_vs_ar"] == pytest.approx(2.0 / (3 / 3.0))
    assert summary["chain"]["acceptance_by_position"] == [1.0, 0.0]
    assert summary["chain"]["mean_verified_nodes"] == 3


def test_sessions_on_different_hosts_are_flagged():
    """A resumed run that moved to another CPU says which groups each host measured and warns about tokens/s."""
    from castspec.bench.report import _sessions_table

    sessions = [{"started": "day 1", "environment": {"cpu": "EPYC (AVX512, bf16)", "commit": "aaa"}},
                {"started": "day 2", "environment": {"cpu": "EPYC (AVX2)", "commit": "bbb"}}]
    records = [{"task": "humaneval", "session": 0}] * 2 + [{"task": "gsm8k", "session": 1}]
    text = "\n".join(_sessions_table({"sessions": sessions, "records": records}))
    assert "| 1 | day 1 | EPYC (AVX512, bf16) | aaa | humaneval 2 |" in text
    assert "| 2 | day 2 | EPYC (AVX2) | bbb | gsm8k 1 |" in text
    assert "different CPUs" in text
    same = [sessions[0], {**sessions[0], "started": "day 2"}]
    assert "different CPUs" not in "\n".join(_sessions_table({"sessions": same, "records": records}))
