"""`castspec serve` end to end: a real uvicorn server on a free port, tiny random models, the official `openai`
client for the happy paths and raw `httpx` for errors.

Every greedy answer must equal `gen.generate` of the same prompt alone, whatever else shared its steps; a seeded
sampled answer must be the same alone and in a burst. The engine is held still (a gate on its steps) wherever a test
needs requests to be queued at the same time, so nothing depends on how fast this machine is.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn

from castspec.cli import main
from castspec.cost.table import OnlineCosts
from castspec.engine import SpeculativeGenerator
from castspec.errors import CastspecError
from castspec.server.app import create_app, listen
from castspec.server.metrics import parse_metrics
from castspec.text import IncrementalText
from tests.conftest import ToyTokenizer, tiny_model
from tests.test_cast import FLAT

MODEL = "tiny-target"
FAIL_TOKEN = 96  # a prompt holding this token id fails to join the batch (see `Controlled`)
ROLE_IDS = {"system": 3, "developer": 3, "user": 4, "assistant": 5, "tool": 5}
CHAT = [{"role": "system", "content": "9 9"}, {"role": "user", "content": "20 21 22"}]
# (prompt text, max_tokens): different lengths and budgets, so rows join and leave at different steps
BURST = [("5 17 33", 30), ("11", 12), ("3 4 5 6 7 8 9 10 11 12 13", 24), ("40 41", 18), ("7 7 7 7", 9),
         ("60 1 62", 27)]
SAMPLED = {"prompt": "8 30 31", "max_tokens": 20, "temperature": 0.8, "top_k": 20, "seed": 123}


class ChatToyTokenizer(ToyTokenizer):
    """The toy tokenizer with a chat template: each message is its role's id then its content's ids."""

    chat_template = "toy: role id, content ids"

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
        ids = []
        for message in messages:
            if message["role"] == "tool":
                raise ValueError("this template has no tool role")
            ids += [ROLE_IDS[message["role"]]] + self(message["content"])["input_ids"]
        return ids + ([ROLE_IDS["assistant"]] if add_generation_prompt else [])


class Controlled:
    """A generator with test hooks: `gate` holds every step until set, a prompt holding FAIL_TOKEN fails to join,
    and a step over at least `fail_rows` rows raises."""

    def __init__(self, gen: SpeculativeGenerator):
        self.gen = gen
        self.gate = threading.Event()
        self.gate.set()
        self.fail_rows: int | None = None

    def __getattr__(self, name):
        return getattr(self.gen, name)

    def add_rows(self, state, keys, prompts, *rest):
        if any(FAIL_TOKEN in prompt for prompt in prompts):
            raise CastspecError("injected: this prompt cannot join")
        return self.gen.add_rows(state, keys, prompts, *rest)

    def step(self, state):
        self.gate.wait()
        if self.fail_rows is not None and len(state.rows) >= self.fail_rows:
            raise RuntimeError("injected step failure")
        return self.gen.step(state)


def make_generator(target) -> SpeculativeGenerator:
    """cast over a draft that is a noisy copy of the target: it agrees often, not always."""
    draft = tiny_model("qwen2", seed=0, sharpen=30.0)
    torch.manual_seed(7)
    with torch.no_grad():
        for param in draft.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return SpeculativeGenerator(target, ChatToyTokenizer(), draft=draft, policy="cast", costs=OnlineCosts(FLAT))


class Server:
    """uvicorn serving `app` from a background thread on a free localhost port."""

    def __init__(self, app):
        self.app = app
        sock = listen("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, "the server to start")
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        self.http = httpx.Client(base_url=self.url, timeout=60)

    @property
    def scheduler(self):
        return self.app.state.service.scheduler

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.http.get("/metrics").text)

    def stop(self) -> None:
        self.client.close()
        self.http.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_for(condition, what: str, timeout_s: float = 60.0) -> None:
    """Poll until `condition()` holds; a deadline only so that a bug fails instead of hanging."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def text_of(gen, ids: list[int]) -> str:
    """What the server sends for these output tokens: their decoding, EOS left out."""
    return gen.tokenizer.decode([t for t in ids if t not in gen.eos_ids])


@pytest.fixture(scope="module")
def target():
    return tiny_model("qwen2", seed=0, sharpen=30.0)


@pytest.fixture(scope="module")
def expected(target):
    """Every output the tests expect, from `generate` alone on a generator of its own."""
    gen = make_generator(target)
    out = {(p, n): gen.generate(gen.encode(p), max_new_tokens=n).token_ids for p, n in BURST}
    out["chat", 15] = gen.generate(gen.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True),
                                   max_new_tokens=15).token_ids
    out["sampled"] = gen.generate(gen.encode(SAMPLED["prompt"]), max_new_tokens=SAMPLED["max_tokens"],
                                  temperature=0.8, top_k=20, seed=123).token_ids
    return {key: (ids, text_of(gen, ids)) for key, ids in out.items()}


@pytest.fixture(scope="module")
def served(target):
    gen = Controlled(make_generator(target))
    server = Server(create_app(gen, MODEL, max_batch_size=4, max_queue=64))
    server.gen = gen
    yield server
    server.stop()


@pytest.fixture
def server(served):
    """The module's server, its hooks reset and its engine idle after each test."""
    yield served
    served.gen.gate.set()
    served.gen.fail_rows = None
    wait_for(lambda: served.scheduler.counts() == (0, 0), "the engine to go idle")


def complete(server, prompt: str, max_tokens: int, **extra):
    return server.client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                            **extra)


# --- the OpenAI API, exact outputs ----------------------------------------------------------------------------
def test_completion_is_generate_alone(server, expected):
    prompt, n = BURST[0]
    result = complete(server, prompt, n)
    ids, text = expected[prompt, n]
    assert result.choices[0].text == text
    assert result.choices[0].finish_reason == ("stop" if ids[-1] in server.gen.eos_ids else "length")
    assert result.object == "text_completion" and result.model == MODEL
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (3, len(ids))
    assert result.usage.total_tokens == 3 + len(ids)
    timings = result.model_extra["timings"]
    assert timings["prompt_n"] == 3 and timings["predicted_n"] == len(ids)
    assert 0 <= timings["draft_n_accepted"] <= timings["draft_n"] and timings["predicted_per_second"] > 0


def test_a_follow_up_prefills_only_what_it_adds_and_says_so(server, target, expected):
    """The next request continues the last one (its prompt and answer, then more): usage and timings count the
    prompt tokens it took from the kept prefix, and the answer is still `generate`'s alone."""
    prompt, n = BURST[2]
    complete(server, prompt, n)
    hits = server.metrics()["castspec:prefix_cache_hits_total"]
    follow_up = [int(t) for t in prompt.split()] + expected[prompt, n][0] + [7, 9]
    result = server.client.completions.create(model=MODEL, prompt=follow_up, max_tokens=6, temperature=0)
    cached = len(follow_up) - 3  # all but the answer's last token (never fed back) and the two new ones
    assert result.usage.prompt_tokens_details.cached_tokens == cached
    assert result.model_extra["timings"]["cache_n"] == cached
    assert server.metrics()["castspec:prefix_cache_hits_total"] == hits + cached
    alone = make_generator(target)
    assert result.choices[0].text == text_of(alone, alone.generate(follow_up, max_new_tokens=6).token_ids)


def test_token_id_prompt_and_streaming_with_usage(server, expected):
    prompt, n = BURST[2]
    ids, text = expected[prompt, n]
    chunks = list(complete(server, [int(t) for t in prompt.split()], n, stream=True,
                           stream_options={"include_usage": True}))
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(pieces) == text and len([p for p in pieces if p]) > 1  # streamed, not sent at once
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-2].model_extra["timings"]["predicted_n"] == n
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ids)
    assert chunks[-1].usage.prompt_tokens == len(prompt.split())


def test_chat_plain_and_streamed(server, expected):
    ids, text = expected["chat", 15]
    result = server.client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=15, temperature=0)
    assert result.object == "chat.completion"
    assert result.choices[0].message.role == "assistant" and result.choices[0].message.content == text
    assert result.usage.prompt_tokens == 8 and result.usage.completion_tokens == len(ids)
    stream = server.client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=15,
                                                   temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and chunks[-1].object == "chat.completion.chunk"


def test_a_burst_is_batched_and_every_answer_is_exact(server, expected):
    """Six requests at once, at most four decoded together: each answer equals its prompt's `generate` alone."""
    server.gen.gate.clear()  # hold the engine until all six are in

    def send(index: int):
        prompt, n = BURST[index]
        if index == 1:  # a streamed request in the same batch as plain ones
            return "".join(c.choices[0].text for c in complete(server, prompt, n, stream=True))
        return complete(server, prompt, n).choices[0].text

    with ThreadPoolExecutor(len(BURST)) as pool:
        futures = [pool.submit(send, i) for i in range(len(BURST))]
        wait_for(lambda: sum(server.scheduler.counts()) == len(BURST), "all six requests to arrive")
        before = server.metrics()
        server.gen.gate.set()
        texts = [f.result() for f in futures]
    assert texts == [expected[key][1] for key in BURST]
    after = server.metrics()
    batched = [k for k in after if k.startswith("castspec:step_seconds_count") and 'batch_size="4"' in k]
    assert batched and after[batched[0]] > before.get(batched[0], 0)


def test_a_seeded_sampled_request_is_the_same_alone_twice_and_in_a_burst(server, expected):
    body = {**SAMPLED, "model": MODEL}
    ids, text = expected["sampled"]
    alone = [server.http.post("/v1/completions", json=body).json()["choices"][0]["text"] for _ in range(2)]
    assert alone == [text, text]
    server.gen.gate.clear()
    with ThreadPoolExecutor(4) as pool:
        greedy = [pool.submit(complete, server, p, n) for p, n in BURST[:3]]
        wait_for(lambda: sum(server.scheduler.counts()) == 3, "the greedy requests")
        sampled = pool.submit(server.http.post, "/v1/completions", json=body)
        wait_for(lambda: sum(server.scheduler.counts()) == 4, "the sampled request")
        server.gen.gate.set()
        assert sampled.result().json()["choices"][0]["text"] == text
        assert [f.result().choices[0].text for f in greedy] == [expected[k][1] for k in BURST[:3]]


def test_stop_strings_cut_the_text_and_end_the_row(server, expected):
    prompt, n = BURST[0]
    full = expected[prompt, n][1]
    stop = " " + full.split(" ")[5] + " "  # the sixth token, whole
    cut = full[: full.index(stop)]
    result = complete(server, prompt, n, stop=[stop, "no such text"])
    assert result.choices[0].text == cut and result.choices[0].finish_reason == "stop"
    assert result.usage.completion_tokens < len(expected[prompt, n][0])  # the row left early
    streamed = list(complete(server, prompt, n, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


# --- clients that leave, a full queue, failures ---------------------------------------------------------------
def test_a_client_that_leaves_mid_stream_frees_its_row(server, expected):
    cancelled = server.metrics().get("castspec:request_cancelled_total", 0)
    body = {"model": MODEL, "prompt": "5 17 33", "max_tokens": 500, "temperature": 0, "stream": True}
    with server.http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert next(line for line in response.iter_lines() if line.startswith("data:"))
    wait_for(lambda: server.metrics()["castspec:num_requests_running"] == 0, "the row to be removed")
    assert server.metrics()["castspec:request_cancelled_total"] == cancelled + 1
    assert server.http.get("/health").status_code == 200
    prompt, n = BURST[1]
    assert complete(server, prompt, n).choices[0].text == expected[prompt, n][1]


def test_a_client_that_leaves_before_a_plain_answer_frees_its_row(server):
    cancelled = server.metrics().get("castspec:request_cancelled_total", 0)
    server.gen.gate.clear()
    body = {"model": MODEL, "prompt": "5 17 33", "max_tokens": 200, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        server.http.post("/v1/completions", json=body, timeout=0.5)  # gives up while the engine is held
    server.gen.gate.set()
    wait_for(lambda: server.metrics()["castspec:num_requests_running"] == 0, "the row to be removed")
    assert server.metrics()["castspec:request_cancelled_total"] == cancelled + 1


def test_a_request_that_fails_to_join_fails_alone(server, expected):
    server.gen.gate.clear()
    with ThreadPoolExecutor(3) as pool:
        good = [pool.submit(complete, server, p, n) for p, n in BURST[:2]]
        wait_for(lambda: sum(server.scheduler.counts()) == 2, "the good requests")
        bad = pool.submit(server.http.post, "/v1/completions",
                          json={"prompt": f"5 {FAIL_TOKEN} 6", "max_tokens": 5, "temperature": 0})
        wait_for(lambda: sum(server.scheduler.counts()) == 3, "the bad request")
        server.gen.gate.set()
        assert bad.result().status_code == 400
        assert "injected" in bad.result().json()["error"]["message"]
        assert [f.result().choices[0].text for f in good] == [expected[k][1] for k in BURST[:2]]


def test_a_failing_step_fails_its_batch_and_the_server_serves_on(server, expected):
    server.gen.fail_rows = 2
    server.gen.gate.clear()
    body = {"model": MODEL, "prompt": "5 17 33", "max_tokens": 50, "temperature": 0}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(server.http.post, "/v1/completions", json=body)
        wait_for(lambda: server.scheduler.counts() == (1, 0), "the first request to run")
        second = pool.submit(server.http.post, "/v1/completions", json={**body, "prompt": "11", "stream": True})
        wait_for(lambda: server.scheduler.counts() == (1, 1), "the second request to wait")
        server.gen.gate.set()  # step 1 (one row) passes, step 2 (both rows) fails
        assert first.result().status_code == 500 and first.result().json()["error"]["type"] == "server_error"
        events = [line for line in second.result().text.splitlines() if line.startswith("data:")]
        assert json.loads(events[-2][5:])["error"]["message"].startswith("the engine step failed")
        assert events[-1] == "data: [DONE]"
    server.gen.fail_rows = None
    prompt, n = BURST[3]
    assert complete(server, prompt, n).choices[0].text == expected[prompt, n][1]


def test_a_full_queue_answers_503_and_every_accepted_request_finishes(target, expected):
    gen = Controlled(make_generator(target))
    small = Server(create_app(gen, MODEL, max_batch_size=1, max_queue=1))
    try:
        gen.gate.clear()
        (p1, n1), (p2, n2) = BURST[0], BURST[3]
        with ThreadPoolExecutor(6) as pool:
            running = pool.submit(complete, small, p1, n1)
            wait_for(lambda: small.scheduler.counts() == (1, 0), "one running")
            waiting = pool.submit(complete, small, p2, n2)
            wait_for(lambda: small.scheduler.counts() == (1, 1), "one waiting")
            body = {"prompt": "5 6", "max_tokens": 300, "temperature": 0}
            refused = [f.result() for f in [pool.submit(small.http.post, "/v1/completions", json=body)
                                            for _ in range(4)]]
            gen.gate.set()
            assert running.result().choices[0].text == expected[p1, n1][1]
            assert waiting.result().choices[0].text == expected[p2, n2][1]
        assert all(r.status_code == 503 and r.headers["Retry-After"] == "1" for r in refused)
        assert refused[0].json()["error"]["code"] == "queue_full"
        assert small.metrics()["castspec:request_rejected_total"] == 4
    finally:
        gen.gate.set()
        small.stop()


def test_shutdown_lets_running_requests_finish_then_cancels_after_the_timeout(target):
    import asyncio

    from castspec.server.scheduler import Failed, Job, QueueFull, Scheduler
    from castspec.verify import SamplingConfig

    gen = Controlled(make_generator(target))

    async def run() -> tuple[object, object]:
        scheduler = Scheduler(gen, max_batch_size=2, max_queue=4)
        scheduler.start()
        loop = asyncio.get_running_loop()
        running = Job([5, 17, 33], 40, SamplingConfig(), IncrementalText(gen.tokenizer), loop)
        waiting = Job([11], 300, SamplingConfig(), IncrementalText(gen.tokenizer), loop)
        gen.gate.clear()
        scheduler.submit(running)
        await asyncio.to_thread(wait_for, lambda: scheduler.counts() == (1, 0), "one to run")
        scheduler.submit(waiting)
        closing = asyncio.create_task(asyncio.to_thread(scheduler.close, 0.0))
        await asyncio.to_thread(wait_for, lambda: scheduler._abort, "the timeout")
        gen.gate.set()
        await closing
        with pytest.raises(QueueFull):  # refused once closing
            scheduler.submit(Job([5], 2, SamplingConfig(), IncrementalText(gen.tokenizer), loop))
        return await last_event(running), await last_event(waiting)

    async def last_event(job):
        while True:
            event = await job.events.get()
            if not hasattr(event, "text"):
                return event

    running, waiting = asyncio.run(run())
    assert isinstance(waiting, Failed) and waiting.status == 503  # never admitted: cancelled at the timeout
    assert isinstance(running, Failed) and running.status == 503  # 40 tokens take more than one step


# --- bad requests ---------------------------------------------------------------------------------------------
BAD = [
    ("/v1/completions", b'{"prompt": "5 6", "max_tokens": ', 400, None),
    ("/v1/completions", b'["5 6"]', 400, None),
    ("/v1/completions", {"prompt": "5 6", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "5 6", "max_tokens": "16"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "5 6", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "5 6", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "5 6", "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": "5 6", "stop": [""]}, 400, "stop.0"),
    ("/v1/completions", {"prompt": "5 6", "model": "gpt-4"}, 400, "model"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": "   "}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5, 500]}, 400, "prompt"),
    ("/v1/completions", {"max_tokens": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": "5 " * 800, "max_tokens": 16}, 400, "prompt"),
    ("/v1/completions", {"prompt": "5 6", "max_tokens": 900}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "bot", "content": "5"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": -3}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "5"}]}, 400, "messages"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD)
def test_bad_requests_get_an_openai_error_and_the_server_serves_on(server, path, body, status, param):
    if isinstance(body, bytes):
        response = server.http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        response = server.http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert server.http.post("/v1/completions", json={"prompt": "5 6", "max_tokens": 2}).status_code == 200


def test_the_openai_client_raises_on_errors(server):
    with pytest.raises(openai.BadRequestError, match="model_not_found|does not exist"):
        server.client.completions.create(model="gpt-4", prompt="5", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        server.client.completions.create(model=MODEL, prompt="5", max_tokens=0)


def test_models_health_and_unknown_paths(server):
    assert server.client.models.list().data[0].id == MODEL
    assert server.http.get("/health").json() == {"status": "ok"}
    missing = server.http.get("/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"


# --- metrics --------------------------------------------------------------------------------------------------
def test_metrics_add_up(server):
    for prompt, n in BURST[:3]:
        complete(server, prompt, n)
    m = server.metrics()
    drafts, draft_tokens = m["castspec:spec_decode_num_drafts_total"], m["castspec:spec_decode_num_draft_tokens_total"]
    accepted = m["castspec:spec_decode_num_accepted_tokens_total"]
    assert drafts > 0 and 0 < accepted <= draft_tokens
    per_pos = [m[f'castspec:spec_decode_num_accepted_tokens_per_pos_total{{position="{i}"}}']
               for i in range(sum(1 for k in m if "per_pos" in k))]
    assert per_pos == sorted(per_pos, reverse=True) and sum(per_pos) == accepted
    assert per_pos[0] <= drafts
    assert m["castspec:num_requests_running"] == 0 and m["castspec:num_requests_waiting"] == 0
    assert m["castspec:prompt_tokens_total"] > 0
    assert m["castspec:generation_tokens_total"] >= sum(n for _, n in BURST[:3])
    assert m['castspec:request_success_total{finish_reason="length"}'] >= 3
    assert m['castspec:step_seconds_count{batch_size="1"}'] == m['castspec:step_depth_count{batch_size="1"}'] > 0
    assert m['castspec:step_predicted_seconds_count{batch_size="1"}'] > 0  # cast predicts its steps' time


# --- pieces ---------------------------------------------------------------------------------------------------
class CharTokenizer:
    """One character per token id (chr), to test text that splits anywhere."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_stop_strings_are_held_back_until_decided():
    text = IncrementalText(CharTokenizer(), stop=["END", "xy"])
    feed = [text.feed([ord(c) for c in piece]) for piece in ("ab", "cE", "N", "Dzz")]
    assert feed == [("ab", False), ("c", False), ("", False), ("", True)]
    assert text.sent == "abc"
    text = IncrementalText(CharTokenizer(), stop=["END"])
    assert text.feed([ord(c) for c in "aEN"]) == ("a", False)
    assert text.feed([ord("x")]) == ("ENx", False)  # it was not a stop string after all
    assert text.feed([ord("E")], final=True) == ("E", False)  # nothing held at the end
    earliest = IncrementalText(CharTokenizer(), stop=["cd", "b"])
    assert earliest.feed([ord(c) for c in "abcd"]) == ("a", True)


def test_half_characters_wait_and_eos_is_not_text():
    class Bytes:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    text = IncrementalText(Bytes(), skip_ids={0})
    euro = "€".encode()
    assert text.feed([ord("a"), euro[0]]) == ("a", False)  # half a character waits for the rest
    assert text.feed([euro[1]]) == ("", False)
    assert text.feed([euro[2], 0], final=True) == ("€", False)
    assert text.sent == "a€"


# --- the command line -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("argv", "message"), [
    (["--port", "70000"], "a TCP port is 0 .. 65535"),
    (["--max-batch-size", "0"], "must be at least 1"),
    (["--max-queue", "-1"], "must be 0 or more"),
    (["--shutdown-timeout", "-2"], "--shutdown-timeout must be 0 or more"),
    (["--host", "256.1.1.1"], "cannot listen on 256.1.1.1"),
])
def test_serve_refuses_bad_arguments_in_one_line(capsys, argv, message):
    assert main(["serve", "--target", "/nonexistent", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("castspec: error:") and message in err and "\n" not in err


def test_serve_refuses_a_busy_port_before_loading(capsys):
    sock = listen("127.0.0.1", 0)
    try:
        assert main(["serve", "--target", "/nonexistent", "--port", str(sock.getsockname()[1])]) == 2
    finally:
        sock.close()
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_castspec_serve_end_to_end_and_graceful_sigterm(tmp_path):
    """The real command on saved tiny models: it answers, and SIGTERM lets a running stream finish first."""
    from tests.test_cli import save_tiny

    target, draft = save_tiny(tmp_path / "target", seed=0), save_tiny(tmp_path / "draft", seed=0, layers=1)
    port = listen("127.0.0.1", 0)
    number = port.getsockname()[1]
    port.close()
    command = [sys.executable, "-m", "castspec", "serve", "--target", target, "--draft", draft, "--policy",
               "chain:gamma=2", "--port", str(number), "--max-batch-size", "2", "--threads", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{number}"
    try:
        wait_for(lambda: process.poll() is not None or _healthy(url), "castspec serve to start", timeout_s=120)
        assert process.poll() is None, process.stdout.read()
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        chat = client.chat.completions.create(model=target, messages=[{"role": "user", "content": "hello"}],
                                              max_tokens=5, temperature=0)
        assert chat.usage.completion_tokens == 5 and chat.choices[0].finish_reason == "length"
        stream = client.completions.create(model=target, prompt="abc", max_tokens=60, temperature=0, stream=True)
        first = next(iter(stream))
        process.send_signal(signal.SIGTERM)
        rest = list(stream)
        assert rest[-1].choices[0].finish_reason == "length"
        assert rest[-1].model_extra["timings"]["predicted_n"] == 60 and first.choices
        assert process.wait(timeout=60) == 0  # a clean exit after the drain
        assert "castspec: serving" in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
