"""`--target-dtype auto`: the fastest format measured here among those whose quality passed the check."""

from __future__ import annotations

import pytest

from castspec.models import format_choice

RECORD = {"m": {"fp32": {"pass1": 0.60}, "q4k": {"agreement": 0.995, "pass1": 0.59},
                "int8": {"agreement": 0.99, "pass1": 0.57}, "bf16": {"agreement": 0.96, "pass1": 0.60}}}


@pytest.fixture
def record(monkeypatch):
    monkeypatch.setattr(format_choice, "quality_records", lambda: RECORD)


def test_only_formats_that_pass_both_checks_are_eligible(record):
    """int8 is 3 points below fp32's pass@1, bf16 agrees on fewer than 97% of tokens."""
    assert format_choice.eligible_formats("m") == ["fp32", "q4k"]
    assert format_choice.eligible_formats("unknown") == ["fp32"]


def test_a_format_with_an_unmeasured_check_is_not_eligible(monkeypatch):
    monkeypatch.setattr(format_choice, "quality_records", lambda: {"m": {"fp32": {"pass1": None},
                                                                         "q4k": {"agreement": 0.99, "pass1": 0.6}}})
    assert format_choice.eligible_formats("m") == ["fp32"]


def test_the_fastest_eligible_format_measured_here_wins(record, monkeypatch):
    monkeypatch.setattr(format_choice, "measured_ms", lambda formats: {"fp32": 3.0, "q4k": 0.5}
                        if "q4k" in formats else {"fp32": 3.0})
    assert format_choice.choose_target_dtype("m", "cpu")[0] == "q4k"
    monkeypatch.setattr(format_choice, "measured_ms", lambda formats: {"fp32": 0.4, "q4k": 0.5})
    assert format_choice.choose_target_dtype("m", "cpu")[0] == "fp32"
    assert format_choice.choose_target_dtype("m", "cuda")[0] == "fp32"  # q4k runs on the CPU only
    assert format_choice.choose_target_dtype("unknown", "cpu")[0] == "fp32"


def test_measurements_run_once_per_machine_and_are_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("CASTSPEC_HOME", str(tmp_path))
    first = format_choice.measured_ms(["fp32", "q4k"])
    assert set(first) == {"fp32", "q4k"} and all(ms > 0 for ms in first.values())
    monkeypatch.setattr(format_choice, "measure_ms", lambda fmt: pytest.fail("measured again"))
    assert format_choice.measured_ms(["q4k"]) == {"q4k": first["q4k"]}


def test_the_shipped_quality_record_reads():
    for model, formats in format_choice.quality_records().items():
        assert "fp32" in formats, model
        assert all(v is None or 0 <= v <= 1 for f in formats.values() for k, v in f.items() if k != "source")


def test_auto_runs_a_model_without_a_quality_check_in_fp32(tmp_path):
    from castspec import api
    from castspec.models.kernels import describe_kernels
    from tests.test_cli import save_tiny

    gen = api.load_generator(save_tiny(tmp_path / "t"), draft="none", policy="ar")
    assert "q4k" not in describe_kernels(gen.target.model) and "int8" not in describe_kernels(gen.target.model)
