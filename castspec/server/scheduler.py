"""The engine thread: the only thread that touches the generator (it holds the models' caches).

Requests wait in a bounded queue. Between steps the thread drops cancelled rows, admits waiting requests up to
`max_batch_size` live rows (one prefill, `gen.add_rows`), runs one speculative step for every live row and hands each
request its new text through its own asyncio queue (`loop.call_soon_threadsafe`: the HTTP side runs on another
thread's event loop). Which rows share a step never changes a greedy row's tokens, nor a seeded sampled row's: the
engine guarantees it, so a request gets the same output however busy the server is.

A request that fails while joining fails alone; a step that fails takes its batch down (500 to each of its requests)
and the thread starts a fresh batch and keeps serving.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from castspec.errors import CastspecError
from castspec.server.metrics import Metrics, RowStep
from castspec.text import IncrementalText
from castspec.verify import SamplingConfig

log = logging.getLogger("castspec.server")


# --- what a request receives -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, Any]
    cached_tokens: int = 0  # prompt tokens taken from the prefix kept of the last request (not prefilled)


@dataclass(frozen=True)
class Failed:
    status: int
    message: str
    type: str = "server_error"


class QueueFull(Exception):
    """The waiting queue is full (or the server is stopping): answer 503, try again later."""


@dataclass(eq=False)
class Job:
    """One request as the engine sees it. The handler owns `events`; the engine thread owns the rest."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingConfig
    text: IncrementalText
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    key: int = -1
    produced: int = 0
    joined_s: float = 0.0  # when its prefill finished (perf_counter)

    def send(self, event: TextDelta | Finished | Failed) -> None:
        """Hand an event to the request's handler, on its event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            pass


class Scheduler:
    """Owns the generator and its live batch; `submit` and `cancel` are safe from any thread."""

    def __init__(self, gen, max_batch_size: int = 8, max_queue: int = 64, metrics: Metrics | None = None):
        if max_batch_size < 1 or max_queue < 0:
            raise CastspecError(f"max_batch_size must be >= 1 and max_queue >= 0, got {max_batch_size}, {max_queue}")
        self.gen = gen
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.metrics = metrics or Metrics()
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._live: dict[int, Job] = {}  # by key; written under the lock, so counts() is consistent
        self._cancelled: set[int] = set()
        self._keys = itertools.count()
        self._accepting, self._stopping, self._abort = True, False, False
        self._shutdown_timeout_s, self._deadline = 30.0, float("inf")  # run_here's drain limit; set by stop()
        self._running = False
        self._thread = threading.Thread(target=self._run, name="castspec-engine", daemon=True)
        self.state = None

    # --- any thread ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Run the engine loop in its own thread (tests, embedding); `castspec serve` uses `run_here`."""
        self.state = self.gen.open_batch()
        self._running = True
        self._thread.start()

    @property
    def alive(self) -> bool:
        """The engine loop is running (in its own thread or in `run_here`'s)."""
        return self._running

    def submit(self, job: Job) -> None:
        """Queue a request, or raise `QueueFull` when `max_queue` requests already wait (or we are stopping)."""
        with self._cond:
            if not self._accepting:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            job.key = next(self._keys)
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The request is no longer wanted (its client left): forget it if waiting, remove its row before the next
        step if live. A request that already finished is left alone."""
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                self.metrics.count("request_cancelled")
            elif job.key in self._live:
                self._cancelled.add(job.key)
                self._cond.notify()

    def counts(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        with self._cond:
            return len(self._live), len(self._waiting)

    def run_here(self, shutdown_timeout_s: float = 30.0) -> None:
        """Run the engine loop in the calling thread until `stop()` and the requests still in flight have finished
        (those left after `shutdown_timeout_s` are cancelled with 503).

        `castspec serve` runs it in the main thread, the HTTP server in another: torch's OpenMP workers serve the
        main thread's team at full speed, while ops issued from a second Python thread ran 40-75% slower here
        (AMD EPYC AVX2, 2 cores; /work measurements in the issue-16 note)."""
        self.state = self.gen.open_batch()
        self._shutdown_timeout_s = shutdown_timeout_s
        self._run()

    def stop(self) -> None:
        """Stop admitting requests; the loop ends when the ones in flight have finished (safe in a signal handler:
        the condition's lock is reentrant)."""
        with self._cond:
            if not self._stopping:
                self._deadline = time.monotonic() + self._shutdown_timeout_s
            self._accepting = False
            self._stopping = True
            self._cond.notify()

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop admitting new requests, let the queued and live ones finish for up to `timeout_s`, then cancel what
        is left (503 to each) and end the thread."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout_s)
        with self._cond:
            self._abort = True
            self._cond.notify()
        self._thread.join()

    # --- the engine thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        self._running = True
        try:
            self._loop()
        finally:
            self._running = False

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._live or self._stopping):
                    self._cond.wait()
                if self._stopping and time.monotonic() > self._deadline:
                    self._abort = True
                if self._abort or (self._stopping and not self._waiting and not self._live):
                    break
                cancelled, self._cancelled = self._cancelled, set()
                room = self.max_batch_size - len(self._live)
                admit = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
                self._live.update((job.key, job) for job in admit)
            try:
                self._drop(cancelled)
                self._admit(admit)
                self._step()
            except Exception:  # a bug of ours, not of one request: fail the batch, serve on
                log.exception("engine loop failed; failing the live batch")
                self._fail_batch("internal error in the engine loop")
        self._fail_all(Failed(503, "the server is shutting down", "server_error"))

    def _drop(self, keys: set[int]) -> None:
        """Cancelled rows leave the batch before the next step."""
        keys = {key for key in keys if key in self._live}
        if not keys:
            return
        self.gen.remove_rows(self.state, sorted(keys))
        for key in keys:
            self._forget(key)
            self.metrics.count("request_cancelled")

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill the new requests in one go; if that fails, one at a time, so only the bad one fails."""
        if not jobs:
            return
        try:
            events = self.gen.add_rows(self.state, [job.key for job in jobs], [job.prompt_ids for job in jobs],
                                       [job.max_tokens for job in jobs], [self.gen.chooser(j.sampling) for j in jobs])
        except Exception as err:
            if len(jobs) > 1:
                for job in jobs:
                    self._admit([job])
                return
            self._fail(jobs[0], _as_failure(err))
            return
        now = time.perf_counter()
        for job in jobs:
            job.joined_s = now
        self._deliver(events)

    def _step(self) -> None:
        for key in set(self._live) - set(self.state.rows):  # cannot happen; if it did, the loop would spin
            self._fail(self._live[key], Failed(500, "the request lost its row in the batch"))
        if not self.state.rows:
            return
        rows = list(self.state.rows)
        t0 = time.perf_counter()
        try:
            events = self.gen.step(self.state)
        except Exception as err:
            log.exception("engine step failed for %d rows; starting a fresh batch", len(rows))
            self._fail_batch(f"the engine step failed: {type(err).__name__}: {err}")
            return
        self._observe(rows, time.perf_counter() - t0)
        self._deliver(events)

    def _observe(self, rows: list[int], seconds: float) -> None:
        """This step's drafting record, from each row's stats (the engine appended one entry per row)."""
        stats = [self.state.stats[key] for key in rows]
        plan = stats[0].plans[-1] if stats and len(stats[0].plans) == stats[0].steps else {}
        predicted = None
        if "predicted_draft_ms" in plan and "predicted_verify_ms" in plan:
            predicted = (plan["predicted_draft_ms"] + plan["predicted_verify_ms"]) / 1000
        self.metrics.observe_step([RowStep(s.verified[-1], s.accepted[-1]) for s in stats],
                                  stats[0].depths[-1] if stats else 0, seconds, predicted)

    def _deliver(self, events: list[tuple[int, list[int], bool]]) -> None:
        """New tokens to their requests: text pieces, then the end (EOS, budget, or a stop string)."""
        for key, tokens, finished in events:
            job = self._live.get(key)
            if job is None:
                continue
            job.produced += len(tokens)
            piece, stopped = job.text.feed(tokens, final=finished)
            if piece:
                job.send(TextDelta(piece))
            if stopped and not finished:
                self.gen.remove_rows(self.state, [key])  # no more work for a row its stop string has ended
            if stopped or finished:
                eos = bool(tokens) and tokens[-1] in self.gen.eos_ids
                self._finish(job, "stop" if stopped or eos else "length")

    def _finish(self, job: Job, reason: str) -> None:
        stats = self.state.stats[job.key]
        elapsed_ms = 1000 * (time.perf_counter() - job.joined_s)
        timings = {"prompt_n": len(job.prompt_ids), "cache_n": stats.cached_tokens,
                   "prompt_ms": round(1000 * stats.prefill_s, 3),
                   "predicted_n": job.produced, "predicted_ms": round(elapsed_ms, 3),
                   "predicted_per_second": round(1000 * job.produced / elapsed_ms, 3) if elapsed_ms > 0 else 0.0,
                   "draft_n": sum(stats.verified), "draft_n_accepted": sum(stats.accepted)}
        self.metrics.request_finished(len(job.prompt_ids), job.produced, reason, stats.cached_tokens)
        job.send(Finished(reason, len(job.prompt_ids), job.produced, timings, stats.cached_tokens))
        self._forget(job.key)

    def _fail(self, job: Job, failure: Failed) -> None:
        self.metrics.count("request_failure")
        job.send(failure)
        self._forget(job.key)

    def _fail_batch(self, message: str) -> None:
        """Every live request fails with a 500; the next requests start a fresh batch."""
        for job in list(self._live.values()):
            self._fail(job, Failed(500, message))
        self.state = self.gen.open_batch()

    def _fail_all(self, failure: Failed) -> None:
        with self._cond:
            jobs = list(self._live.values()) + list(self._waiting)
            self._waiting.clear()
        for job in jobs:
            self._fail(job, failure)

    def _forget(self, key: int) -> None:
        with self._cond:
            self._live.pop(key, None)
            self._cancelled.discard(key)
        self.state.forget([key])


def _as_failure(err: Exception) -> Failed:
    """A request's own bad input is a 400; anything else is ours, a 500."""
    if isinstance(err, CastspecError):
        return Failed(400, str(err), "invalid_request_error")
    log.exception("a request failed while joining the batch", exc_info=err)
    return Failed(500, f"{type(err).__name__}: {err}")
