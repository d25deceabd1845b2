"""The serving load benchmark's client side: schedules, SSE parsing and the numbers it reports."""

from __future__ import annotations

import json

import pytest

from castspec.bench.serve_load import (
    LoadConfig,
    _take_event,
    arrival_times,
    markdown,
    parse_rates,
    summarize,
    summarize_block,
)
from castspec.errors import CastspecError


def test_rates_are_low_or_positive_numbers():
    assert parse_rates("low, 0.05,0.2") == ["low", "0.05", "0.2"]
    for bad in ("", "fast", "0", "-1"):
        with pytest.raises(CastspecError):
            parse_rates(bad)


def test_poisson_schedule_is_seeded_increasing_and_has_the_rate():
    times = arrival_times("0.5", 4000, seed=1)
    assert times == arrival_times("0.5", 4000, seed=1) and times != arrival_times("0.5", 4000, seed=2)
    assert times[0] == 0.0 and all(b > a for a, b in zip(times, times[1:], strict=False))
    assert 1.9 < times[-1] / (len(times) - 1) < 2.1  # mean gap 1 / rate
    assert arrival_times("low", 5, seed=1) is None


def test_stream_events_collect_text_usage_and_finish():
    record = {"text": "", "chunk_s": []}
    completion = {"choices": [{"index": 0, "text": "def", "finish_reason": None}]}
    chat = {"choices": [{"index": 0, "delta": {"content": " f"}, "finish_reason": "length"}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    for now, event in enumerate([completion, chat, usage]):
        _take_event("data: " + json.dumps(event), record, float(now))
    _take_event("data: [DONE]", record, 9.0)
    _take_event(": keep-alive", record, 9.0)
    assert record == {"text": "def f", "chunk_s": [0.0, 1.0], "finish_reason": "length", "completion_tokens": 2,
                      "prompt_tokens": 3}


def request(rid: str, sent: float, chunks: list[float], done: float, tokens: int, text: str = "x") -> dict:
    return {"id": rid, "sent_s": sent, "chunk_s": chunks, "done_s": done, "completion_tokens": tokens,
            "status": 200, "finish_reason": "length", "text": text}


def test_block_summary_counts_tokens_latencies_and_identity():
    records = [request("a", 0.0, [1.0, 2.0], 5.0, 5, "same"), request("b", 2.0, [4.0], 12.0, 11, "other"),
               {"id": "c", "sent_s": 3.0, "status": 503, "text": "", "chunk_s": [], "finish_reason": None,
                "completion_tokens": None, "done_s": 3.1}]
    s = summarize_block(records, {"a": "same", "b": "same"})
    assert s["answered"] == 2 and s["requests"] == 3 and s["completion_tokens"] == 16
    assert s["throughput_tok_s"] == pytest.approx(16 / 12.0, abs=1e-3)
    assert s["ttft_s_p50"] in (1.0, 2.0) and s["ttft_s_p99"] == 2.0
    assert s["tpot_s_p99"] == 1.0 and s["tpot_s_p50"] in (1.0, 0.8)  # a: (5 - 1) / 4, b: (12 - 4) / 10
    assert s["latency_per_token_s_p50"] in (1.0, pytest.approx(10 / 11, abs=1e-4))
    assert (s["identical_to_alone"], s["compared"]) == (1, 2)


def test_summary_compares_with_ar_alone_and_renders():
    config = LoadConfig(target="t", draft="d", methods=["ar", "cast"], rates=["low", "0.1"])
    blocks = [{"method": m, "rate": r, "records": [request("a", 0.0, [0.5], 2.0 if m == "cast" else 4.0, 8, "y")]}
              for m in ("ar", "cast") for r in ("low", "0.1")]
    table = summarize(blocks, config)
    assert table["0.1"]["cast"]["throughput_vs_ar"] == pytest.approx(2.0)
    assert table["low"]["cast"]["identical_to_alone"] == 1
    text = markdown({"config": vars(config), "env": {"cpu": "cpu", "cores": 2}, "by_rate": table})
    assert "| 0.1 | cast | 1/1 | 1/1 |" in text


def test_the_warm_up_sends_none_of_the_measured_prompts(monkeypatch):
    """The server keeps the last finished request's cache: a warm-up with a measured prompt would hand that request
    its prefill for free."""
    import httpx

    from castspec.bench.serve_load import WARM_UP_TEXT, warm_up

    sent = []

    class Ok:
        def raise_for_status(self) -> None:
            pass

    monkeypatch.setattr(httpx, "post", lambda url, json, timeout: sent.append((url, json)) or Ok())
    chat = {"messages": [{"role": "user", "content": "q1"}], "max_tokens": 128, "stream": True,
            "stream_options": {"include_usage": True}}
    requests = [{"path": "/v1/chat/completions", "body": chat},
                {"path": "/v1/completions", "body": {"prompt": "def f():", "max_tokens": 128, "stream": True}},
                {"path": "/v1/chat/completions", "body": chat}]
    warm_up("http://x", requests)
    assert [url for url, _ in sent] == ["http://x/v1/chat/completions", "http://x/v1/completions"]
    assert sent[0][1]["messages"] == [{"role": "user", "content": WARM_UP_TEXT}]
    assert sent[1][1]["prompt"] == WARM_UP_TEXT
    assert all(body["max_tokens"] == 4 and body["stream"] is False and "stream_options" not in body
               for _, body in sent)
