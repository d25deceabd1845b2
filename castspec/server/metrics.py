"""`/metrics` in the Prometheus text format, written by hand (a few counters, gauges and summaries).

Speculative-decoding counters follow vLLM's names so existing dashboards read them: per sequence and step,
`num_drafts` counts the steps that verified at least one drafted token, `num_draft_tokens` the drafted tokens
verified, `num_accepted_tokens` the ones the target accepted, and `num_accepted_tokens_per_pos{position=i}` the steps
whose accepted run reached position i (so it never grows with i). Acceptance rate = accepted / draft tokens; mean
accepted length per step = 1 + accepted / num_drafts. Steps are also summarised per batch size: verified tree size,
depth, measured time and, for policies that predict it (cast), predicted time.

Counters are written the way `prometheus_client` writes them in this format: the sample name ends in `_total`.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

PREFIX = "castspec:"


@dataclass(frozen=True)
class RowStep:
    """One sequence's part of one step: drafted tokens the target verified, and how many it accepted."""

    verified: int
    accepted: int


class Metrics:
    """Everything `/metrics` reports. The engine thread writes, HTTP handlers read: one lock around both."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: dict[str, float] = defaultdict(float)
        self.accepted_per_pos: dict[int, int] = defaultdict(int)
        self.finished: dict[str, int] = defaultdict(int)  # requests done, by finish reason
        self.summaries: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))

    # --- written by the engine thread and the handlers ---------------------------------------------------------
    def observe_step(self, rows: Sequence[RowStep], depth: int, seconds: float, predicted_s: float | None) -> None:
        """One engine step over `len(rows)` sequences."""
        batch = len(rows)
        with self._lock:
            for row in rows:
                if row.verified > 0:
                    self.counters["spec_decode_num_drafts"] += 1
                self.counters["spec_decode_num_draft_tokens"] += row.verified
                self.counters["spec_decode_num_accepted_tokens"] += row.accepted
                for position in range(row.accepted):
                    self.accepted_per_pos[position] += 1
            self.counters["engine_steps"] += 1
            self._observe("step_verified_tokens", batch, sum(r.verified for r in rows) / max(batch, 1))
            self._observe("step_depth", batch, depth)
            self._observe("step_seconds", batch, seconds)
            if predicted_s is not None:
                self._observe("step_predicted_seconds", batch, predicted_s)

    def _observe(self, name: str, batch: int, value: float) -> None:
        cell = self.summaries[name][batch]
        cell[0] += value
        cell[1] += 1

    def request_finished(self, prompt_tokens: int, completion_tokens: int, finish_reason: str,
                         cached_tokens: int = 0) -> None:
        with self._lock:
            self.finished[finish_reason] += 1
            self.counters["prompt_tokens"] += prompt_tokens
            self.counters["prefix_cache_hits"] += cached_tokens
            self.counters["generation_tokens"] += completion_tokens

    def count(self, name: str) -> None:
        """One more of a plain event counter (`request_failure`, `request_rejected`, `request_cancelled`)."""
        with self._lock:
            self.counters[name] += 1

    # --- read by /metrics --------------------------------------------------------------------------------------
    def render(self, running: int, waiting: int) -> str:
        with self._lock:
            lines: list[str] = []
            for name, help_text in COUNTERS.items():
                _header(lines, f"{name}_total", "counter", help_text)
                lines.append(f"{PREFIX}{name}_total {_num(self.counters[name])}")
            _header(lines, "spec_decode_num_accepted_tokens_per_pos_total", "counter",
                    "Steps whose accepted draft run reached this position (0-based)")
            for position in sorted(self.accepted_per_pos):
                lines.append(f'{PREFIX}spec_decode_num_accepted_tokens_per_pos_total{{position="{position}"}} '
                             f"{self.accepted_per_pos[position]}")
            _header(lines, "request_success_total", "counter", "Requests finished, by finish reason")
            for reason in sorted(set(self.finished) | {"stop", "length"}):
                lines.append(f'{PREFIX}request_success_total{{finish_reason="{reason}"}} {self.finished[reason]}')
            for name, value, help_text in (("num_requests_running", running, "Sequences in the live batch"),
                                           ("num_requests_waiting", waiting, "Requests queued for a batch slot")):
                _header(lines, name, "gauge", help_text)
                lines.append(f"{PREFIX}{name} {value}")
            for name, help_text in SUMMARIES.items():
                _header(lines, name, "summary", help_text)
                for batch, (total, count) in sorted(self.summaries[name].items()):
                    lines.append(f'{PREFIX}{name}_sum{{batch_size="{batch}"}} {_num(total)}')
                    lines.append(f'{PREFIX}{name}_count{{batch_size="{batch}"}} {count}')
        return "\n".join(lines) + "\n"


COUNTERS = {
    "spec_decode_num_drafts": "Sequence-steps that verified at least one drafted token",
    "spec_decode_num_draft_tokens": "Drafted tokens verified by the target, summed over sequences and steps",
    "spec_decode_num_accepted_tokens": "Drafted tokens the target accepted",
    "engine_steps": "Engine steps (one target verification forward for the whole live batch)",
    "prompt_tokens": "Prompt tokens of finished requests",
    "prefix_cache_hits": "Prompt tokens of finished requests taken from the kept prefix of an earlier one",
    "generation_tokens": "Tokens generated for finished requests",
    "request_failure": "Requests that failed in the engine",
    "request_rejected": "Requests refused because the waiting queue was full or the server was stopping",
    "request_cancelled": "Requests whose client went away, or that the server cancelled, before they finished",
}

SUMMARIES = {
    "step_verified_tokens": "Drafted tokens verified per sequence in a step, by live batch size",
    "step_depth": "Depth of the verified draft tree in a step, by live batch size",
    "step_seconds": "Measured wall time of an engine step, by live batch size",
    "step_predicted_seconds": "Step time the policy predicted from its cost table (cast), by live batch size",
}


def _header(lines: list[str], name: str, kind: str, help_text: str) -> None:
    lines.append(f"# HELP {PREFIX}{name} {help_text}")
    lines.append(f"# TYPE {PREFIX}{name} {kind}")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def parse_metrics(text: str) -> dict[str, float]:
    """Samples of a Prometheus text page by full sample name with labels (for tests and quick checks)."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples
