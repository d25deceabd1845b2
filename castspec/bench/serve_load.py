"""Load benchmark for `castspec serve`: requests arriving as a Poisson process, measured from the client's side.

For each rate and each serving mode (a `--policy`), one `castspec serve` process is started, warmed up, sent the
same requests (HumanEval completions and MT-bench chat turns) on the same seeded arrival schedule, and stopped; only
one server (one copy of the models) lives at a time. Rate `low` sends one request at a time (the next when the
previous has finished): it is the "alone" reference. Every request streams, so the client sees when each token
arrives: time to first token, per-token latency, throughput. A greedy output must equal the same request's output
alone (`ar` at `low` if measured, else the mode's own `low` block); the report counts the ones that do.

Blocks go rate by rate, modes in a rotating order, so a slow spell of the machine does not hit one mode only.
Each finished block is appended to `records.jsonl`; `--resume` skips blocks already there with the same settings.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from castspec.errors import CastspecError

LOW = "low"


@dataclass
class LoadConfig:
    target: str
    draft: str
    methods: list[str]
    rates: list[str]  # "low" or requests per second
    num_requests: int = 16  # half HumanEval, half MT-bench first turns
    max_tokens: int = 128
    seed: int = 0
    max_batch_size: int = 8
    max_queue: int = 64
    threads: int | None = None
    spec_bench: str = "../shared/data/spec_bench/question.jsonl"
    server_args: list[str] = field(default_factory=list)

    def fingerprint(self) -> dict[str, Any]:
        """Settings a resumed run must share with the records it keeps."""
        keys = ("target", "draft", "num_requests", "max_tokens", "seed", "max_batch_size", "threads", "server_args")
        return {k: getattr(self, k) for k in keys}


def parse_rates(text: str) -> list[str]:
    rates = [r.strip() for r in text.split(",") if r.strip()]
    for rate in rates:
        if rate != LOW:
            try:
                ok = float(rate) > 0
            except ValueError:
                ok = False
            if not ok:
                raise CastspecError(f"--rates: '{rate}' is neither 'low' nor a positive number of requests/s")
    if not rates:
        raise CastspecError("--rates is empty")
    return rates


# --- what is sent ------------------------------------------------------------------------------------------------
def build_requests(config: LoadConfig) -> list[dict[str, Any]]:
    """Half HumanEval prompts (raw completions), half MT-bench first turns (chat), interleaved, fixed by the seed."""
    from castspec.bench.datasets import load_prompts

    code = load_prompts("humaneval", (config.num_requests + 1) // 2, config.seed)
    chat = load_prompts(f"spec-bench:{config.spec_bench}:mt-bench", config.num_requests // 2, config.seed)
    requests = []
    for i in range(config.num_requests):
        source = code if i % 2 == 0 else chat
        prompt = source[i // 2] if i // 2 < len(source) else None
        if prompt is None:
            continue
        common = {"max_tokens": config.max_tokens, "temperature": 0.0, "stream": True,
                  "stream_options": {"include_usage": True}}
        if prompt.chat:
            body = {"messages": [{"role": "user", "content": prompt.turns[0]}], **common}
            requests.append({"id": prompt.id, "path": "/v1/chat/completions", "body": body})
        else:
            requests.append({"id": prompt.id, "path": "/v1/completions", "body": {"prompt": prompt.turns[0], **common}})
    return requests


def arrival_times(rate: str, count: int, seed: int) -> list[float] | None:
    """Seconds after the block's start at which each request is sent (Poisson process); None for `low`."""
    if rate == LOW:
        return None
    rng = random.Random(f"{seed}:{rate}")
    times, now = [], 0.0
    for _ in range(count):
        times.append(now)
        now += rng.expovariate(float(rate))
    return times


# --- one server ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`castspec serve` in a child process, for one block; its output goes to `log_path`."""

    def __init__(self, config: LoadConfig, method: str, log_path: Path, startup_timeout_s: float = 1800.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "castspec", "serve", "--target", config.target, "--policy", method,
                   "--port", str(self.port), "--max-batch-size", str(config.max_batch_size),
                   "--max-queue", str(config.max_queue), *config.server_args]
        if method != "ar":
            command += ["--draft", config.draft]
        if config.threads:
            command += ["--threads", str(config.threads)]
        self.command = command
        self.log_path = log_path
        self.timeout = startup_timeout_s
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "HF_HUB_OFFLINE": "1"})
        self._wait_healthy()
        return self

    def _wait_healthy(self) -> None:
        import httpx

        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
                raise CastspecError(f"the server exited with {self.process.returncode} while starting: {tail[0]}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise CastspecError(f"the server did not become healthy within {self.timeout:.0f} s (log: {self.log_path})")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


# --- one block: send, stream, time -------------------------------------------------------------------------------
async def _one_request(client, url: str, request: dict[str, Any], start: float) -> dict[str, Any]:
    """Stream one request; record when it was sent, when each piece of text arrived, and what came back."""
    sent = time.perf_counter()
    record: dict[str, Any] = {"id": request["id"], "sent_s": sent - start, "status": None, "text": "",
                              "chunk_s": [], "completion_tokens": None, "finish_reason": None, "error": None}
    try:
        async with client.stream("POST", url + request["path"], json=request["body"]) as response:
            record["status"] = response.status_code
            if response.status_code != 200:
                record["error"] = (await response.aread()).decode(errors="replace")[:500]
                return record
            async for line in response.aiter_lines():
                _take_event(line, record, time.perf_counter() - start)
    except Exception as err:  # noqa: BLE001 - a failed request is data, not a crash of the benchmark
        record["error"] = f"{type(err).__name__}: {err}"
    record["done_s"] = time.perf_counter() - start
    return record


def _take_event(line: str, record: dict[str, Any], now: float) -> None:
    if not line.startswith("data:"):
        return
    data = line[len("data:"):].strip()
    if data == "[DONE]":
        return
    chunk = json.loads(data)
    if chunk.get("usage"):
        record["completion_tokens"] = chunk["usage"]["completion_tokens"]
        record["prompt_tokens"] = chunk["usage"]["prompt_tokens"]
    for choice in chunk.get("choices") or []:
        piece = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
        if piece:
            record["text"] += piece
            record["chunk_s"].append(round(now, 4))
        if choice.get("finish_reason"):
            record["finish_reason"] = choice["finish_reason"]


async def run_block(url: str, requests: list[dict[str, Any]], arrivals: list[float] | None) -> list[dict[str, Any]]:
    """Send every request (on the schedule, or one after another) and collect their records."""
    import httpx

    limits = httpx.Limits(max_connections=len(requests) + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        start = time.perf_counter()
        if arrivals is None:
            return [await _one_request(client, url, r, start) for r in requests]

        async def at(delay: float, request: dict[str, Any]) -> dict[str, Any]:
            await asyncio.sleep(max(0.0, delay - (time.perf_counter() - start)))
            return await _one_request(client, url, request, start)

        return list(await asyncio.gather(*(at(t, r) for t, r in zip(arrivals, requests, strict=True))))


WARM_UP_TEXT = "Hello"


def warm_up(url: str, requests: list[dict[str, Any]]) -> None:
    """One short request per endpoint: first-call allocations are not load. Its text is none of the measured
    prompts: the server keeps the last finished request's cache, and a measured request must not start from its
    own prompt already prefilled."""
    import httpx

    for path in dict.fromkeys(r["path"] for r in requests):
        body = dict(next(r for r in requests if r["path"] == path)["body"], max_tokens=4, stream=False)
        body.pop("stream_options", None)
        if "messages" in body:
            body["messages"] = [{"role": "user", "content": WARM_UP_TEXT}]
        else:
            body["prompt"] = WARM_UP_TEXT
        httpx.post(url + path, json=body, timeout=None).raise_for_status()


# --- summaries ---------------------------------------------------------------------------------------------------
def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summarize_block(records: list[dict[str, Any]], reference: dict[str, str] | None) -> dict[str, Any]:
    """Throughput, latency quantiles, answered and identical counts of one block."""
    ok = [r for r in records if r["status"] == 200 and r["finish_reason"] and r.get("completion_tokens")]
    tokens = sum(r["completion_tokens"] for r in ok)
    span = max((r["done_s"] for r in ok), default=0.0) - min((r["sent_s"] for r in records), default=0.0)
    ttft = [r["chunk_s"][0] - r["sent_s"] for r in ok if r["chunk_s"]]
    per_token = [(r["done_s"] - r["sent_s"]) / r["completion_tokens"] for r in ok]
    tpot = [(r["done_s"] - r["chunk_s"][0]) / (r["completion_tokens"] - 1) for r in ok
            if r["chunk_s"] and r["completion_tokens"] > 1]
    out = {"requests": len(records), "answered": len(ok), "completion_tokens": tokens,
           "throughput_tok_s": round(tokens / span, 3) if span > 0 else None, "span_s": round(span, 2)}
    for name, values in (("ttft_s", ttft), ("latency_per_token_s", per_token), ("tpot_s", tpot)):
        out[f"{name}_p50"] = _round(_quantile(values, 0.5))
        out[f"{name}_p99"] = _round(_quantile(values, 0.99))
    if reference is not None:
        out["identical_to_alone"] = sum(1 for r in ok if reference.get(r["id"]) == r["text"])
        out["compared"] = sum(1 for r in ok if r["id"] in reference)
    return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def summarize(blocks: list[dict[str, Any]], config: LoadConfig) -> dict[str, Any]:
    """Per rate and mode; the `alone` reference is ar at `low` if measured, else each mode's own `low` block."""
    by_key = {(b["method"], b["rate"]): b for b in blocks}
    texts = {key: {r["id"]: r["text"] for r in b["records"] if r["status"] == 200} for key, b in by_key.items()}
    table: dict[str, dict[str, Any]] = {}
    for rate in config.rates:
        row = {}
        for method in config.methods:
            block = by_key.get((method, rate))
            if block is None:
                continue
            reference = texts.get(("ar", LOW)) or texts.get((method, LOW))
            row[method] = summarize_block(block["records"], reference)
        ar = row.get("ar", {}).get("throughput_tok_s")
        for stats in row.values():
            mine = stats.get("throughput_tok_s")
            stats["throughput_vs_ar"] = round(mine / ar, 3) if ar and mine else None
        table[rate] = row
    return table


# --- the run -----------------------------------------------------------------------------------------------------
def run(config: LoadConfig, out_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Measure every (rate, mode) block not yet recorded, then write results.json, results.md and a plot."""
    from castspec.cost.profiler import cpu_description

    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "records.jsonl"
    blocks = _load_blocks(log, config) if resume else []
    if not resume and log.exists():
        log.unlink()
    requests = build_requests(config)
    done = {(b["method"], b["rate"]) for b in blocks}
    env = {"cpu": cpu_description(), "cores": os.cpu_count(), "python": sys.version.split()[0]}
    for index, rate in enumerate(config.rates):
        order = config.methods[index % len(config.methods):] + config.methods[: index % len(config.methods)]
        for method in order:
            if (method, rate) in done:
                continue
            print(f"[bench-serve] {method} at rate {rate}: {len(requests)} requests", file=sys.stderr, flush=True)
            block = measure_block(config, method, rate, requests, out_dir)
            block.update(fingerprint=config.fingerprint(), env=env)
            with log.open("a") as handle:
                handle.write(json.dumps(block) + "\n")
            blocks.append(block)
    results = {"config": asdict(config), "env": env, "by_rate": summarize(blocks, config)}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "results.md").write_text(markdown(results))
    plot(results, out_dir / "load.png")
    return results


def measure_block(config: LoadConfig, method: str, rate: str, requests: list[dict[str, Any]],
                  out_dir: Path) -> dict[str, Any]:
    arrivals = arrival_times(rate, len(requests), config.seed)
    with ServerProcess(config, method, out_dir / "logs" / f"{method.replace(':', '_')}-{rate}.log") as server:
        warm_up(server.url, requests)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        records = asyncio.run(run_block(server.url, requests, arrivals))
        metrics = _metrics(server.url)
    return {"method": method, "rate": rate, "started": started, "records": records, "metrics": metrics}


def _metrics(url: str) -> str:
    import httpx

    try:
        return httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError as err:
        return f"# unavailable: {err}"


def _load_blocks(log: Path, config: LoadConfig) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    blocks = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    wanted = json.loads(json.dumps(config.fingerprint()))
    if any(b.get("fingerprint") != wanted for b in blocks):
        raise CastspecError(f"{log} was measured with other settings; use another --out or drop --resume")
    return blocks


# --- report ------------------------------------------------------------------------------------------------------
def markdown(results: dict[str, Any]) -> str:
    config, env = results["config"], results["env"]
    lines = [f"# castspec serve under load: {config['target']} (draft {config['draft']})", "",
             f"CPU: {env['cpu']} ({env['cores']} cores). {config['num_requests']} requests (HumanEval completions + "
             f"MT-bench chat), {config['max_tokens']} max tokens, greedy, max batch {config['max_batch_size']}; "
             "rate `low` = one request at a time.", "",
             "| rate (req/s) | mode | answered | identical to alone | throughput tok/s | vs ar | TTFT p50 / p99 s "
             "| latency per token p50 / p99 s | TPOT p50 / p99 s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rate, row in results["by_rate"].items():
        for method, s in row.items():
            same = f"{s.get('identical_to_alone', '-')}/{s.get('compared', '-')}"
            lines.append(f"| {rate} | {method} | {s['answered']}/{s['requests']} | {same} | "
                         f"{_fmt(s['throughput_tok_s'], 2)} | {_fmt(s['throughput_vs_ar'], 2)}x | "
                         f"{_fmt(s['ttft_s_p50'], 2)} / {_fmt(s['ttft_s_p99'], 2)} | "
                         f"{_fmt(s['latency_per_token_s_p50'], 3)} / {_fmt(s['latency_per_token_s_p99'], 3)} | "
                         f"{_fmt(s['tpot_s_p50'], 3)} / {_fmt(s['tpot_s_p99'], 3)} |")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(results["by_rate"])
    methods = list(dict.fromkeys(m for row in results["by_rate"].values() for m in row))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in methods:
        xs = [r for r in rates if method in results["by_rate"][r]]
        stats = [results["by_rate"][r][method] for r in xs]
        axes[0].plot(xs, [s["throughput_tok_s"] or 0 for s in stats], marker="o", label=method)
        axes[1].plot(xs, [s["latency_per_token_s_p50"] or 0 for s in stats], marker="o", label=method)
    axes[0].set_ylabel("throughput, tokens/s")
    axes[1].set_ylabel("p50 latency per token, s (request latency / tokens)")
    for ax in axes:
        ax.set_xlabel("arrival rate, requests/s ('low': one at a time)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
