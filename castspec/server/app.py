"""The HTTP side of `castspec serve`: OpenAI's `/v1/completions` and `/v1/chat/completions` (plain and streamed),
`/v1/models`, `/health` and `/metrics`, in front of the engine thread (`castspec.server.scheduler`).

Handlers only validate, tokenize and wait: every model call happens on the engine thread. Status codes: 400 for a bad
request (malformed JSON, wrong types or values, empty or too long prompt, a model name other than the one served:
code `model_not_found`; leaving `model` out is fine), 503 with `Retry-After` when the waiting queue is full or the
server is stopping, 500 when the engine failed. Every error body is OpenAI's
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from castspec.errors import CastspecError
from castspec.server.metrics import Metrics
from castspec.server.protocol import (
    CHAT_MAX_TOKENS,
    COMPLETION_MAX_TOKENS,
    ApiError,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    envelope,
    new_id,
    parse,
    usage,
)
from castspec.server.scheduler import Failed, Finished, Job, QueueFull, Scheduler, TextDelta
from castspec.text import IncrementalText
from castspec.verify import SamplingConfig

RETRY_AFTER_S = 1
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Service:
    """What the endpoints share: the generator (tokenizer only, on this side), the engine thread, the metrics."""

    def __init__(self, gen, model_name: str, max_batch_size: int, max_queue: int):
        self.gen, self.model_name = gen, model_name
        self.metrics = Metrics()
        self.scheduler = Scheduler(gen, max_batch_size, max_queue, self.metrics)
        self.created = int(time.time())

    # --- a request's inputs -------------------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(400, f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        try:
            return self.gen.encode(prompt)
        except CastspecError as err:
            raise ApiError(400, str(err), param="prompt") from None

    def encode_chat(self, messages: list[ChatMessage]) -> list[int]:
        """The conversation through the tokenizer's chat template, ready for the assistant's turn."""
        if not getattr(self.gen.tokenizer, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
        try:
            return self.gen.encode_conversation([m.as_template_input() for m in messages])
        except CastspecError as err:
            raise ApiError(400, str(err), param="messages") from None

    def max_tokens(self, requested: int | None, prompt_len: int, chat: bool) -> int:
        """The request's budget: as asked (checked against the context), else the endpoint's default."""
        room = self.gen.room(prompt_len)
        if room is not None and room < 1:
            raise ApiError(400, f"the prompt of {prompt_len} tokens leaves no room in the model's context",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        if requested is None:
            requested = CHAT_MAX_TOKENS if chat else COMPLETION_MAX_TOKENS
            return min(requested, room) if chat and room is not None else requested
        if room is not None and requested > room:
            raise ApiError(400, f"the prompt of {prompt_len} tokens + max_tokens {requested} exceeds the model's "
                                f"context: at most {room} new tokens fit after this prompt",
                           param="max_tokens", code="context_length_exceeded")
        return requested

    def job(self, body: CompletionRequest | ChatRequest, prompt_ids: list[int], chat: bool) -> Job:
        requested = (body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens
        budget = self.max_tokens(requested, len(prompt_ids), chat)
        try:
            sampling = SamplingConfig(1.0 if body.temperature is None else body.temperature, body.top_k or 0,
                                      1.0 if body.top_p is None else body.top_p, body.seed)
        except CastspecError as err:
            raise ApiError(400, str(err)) from None
        text = IncrementalText(self.gen.tokenizer, body.stop_strings(), self.gen.eos_ids)
        return Job(prompt_ids, budget, sampling, text, asyncio.get_running_loop())

    def submit(self, job: Job) -> None:
        try:
            self.scheduler.submit(job)
        except QueueFull as err:
            self.metrics.count("request_rejected")
            raise ApiError(503, f"the server is busy ({err}); retry later", type="server_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None

    # --- answering ---------------------------------------------------------------------------------------------
    async def respond(self, request: Request, body: CompletionRequest | ChatRequest, prompt_ids: list[int],
                      chat: bool) -> Response:
        job = self.job(body, prompt_ids, chat)
        self.submit(job)
        if body.stream:
            return StreamingResponse(self.stream(job, chat, body.include_usage()), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self.complete(request, job, chat)

    async def complete(self, request: Request, job: Job, chat: bool) -> Response:
        """Wait for the whole output; a client that leaves meanwhile cancels its row."""
        parts: list[str] = []
        gone = asyncio.ensure_future(_disconnected(request))
        done = False
        try:
            while True:
                get = asyncio.ensure_future(job.events.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    return Response(status_code=499)  # nobody reads it: the client has gone
                event = get.result()
                if isinstance(event, TextDelta):
                    parts.append(event.text)
                    continue
                done = True
                if isinstance(event, Failed):
                    raise ApiError(event.status, event.message, type=event.type)
                return JSONResponse(self.final_body(job, chat, "".join(parts), event))
        finally:
            gone.cancel()
            if not done:
                self.scheduler.cancel(job)

    def final_body(self, job: Job, chat: bool, text: str, end: Finished) -> dict:
        kind, prefix = ("chat.completion", "chatcmpl") if chat else ("text_completion", "cmpl")
        choice = {"index": 0, "logprobs": None, "finish_reason": end.finish_reason}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return {**envelope(kind, new_id(prefix), self.model_name), "choices": [choice],
                "usage": usage(end.prompt_tokens, end.completion_tokens, end.cached_tokens), "timings": end.timings}

    async def stream(self, job: Job, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: a chunk per text piece, a last one with the finish reason (and `timings`), a usage
        chunk if asked, then `[DONE]`. A client that leaves cancels its row (Starlette cancels this generator)."""
        head = envelope("chat.completion.chunk" if chat else "text_completion", new_id("chatcmpl" if chat else "cmpl"),
                        self.model_name)
        done = False

        def chunk(text: str, finish_reason: str | None = None, first: bool = False, **extra) -> str:
            choice = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
            if chat:
                choice["delta"] = {"role": "assistant", "content": text} if first else ({"content": text} if text
                                                                                         else {})
            else:
                choice["text"] = text
            body = {**head, "choices": [choice], **({"usage": None} if include_usage else {}), **extra}
            return _sse(body)

        try:
            if chat:
                yield chunk("", first=True)
            while True:
                event = await job.events.get()
                if isinstance(event, TextDelta):
                    yield chunk(event.text)
                    continue
                done = True
                if isinstance(event, Failed):
                    yield _sse(ApiError(event.status, event.message, type=event.type).body())
                    break
                yield chunk("", event.finish_reason, timings=event.timings)
                if include_usage:
                    counts = usage(event.prompt_tokens, event.completion_tokens, event.cached_tokens)
                    yield _sse({**head, "choices": [], "usage": counts})
                break
            yield "data: [DONE]\n\n"
        finally:
            if not done:
                self.scheduler.cancel(job)


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read: only a disconnect can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(gen, model_name: str, max_batch_size: int = 8, max_queue: int = 64,
               shutdown_timeout_s: float = 30.0, engine_thread: bool = True) -> FastAPI:
    """The app serving `gen` as `model_name`. With `engine_thread`, its lifespan starts the engine thread and, at
    shutdown, stops admitting, lets live requests finish for up to `shutdown_timeout_s`, then cancels the rest.
    Without, the caller runs the engine loop (`app.state.service.scheduler.run_here`, as `serve` does)."""
    service = Service(gen, model_name, max_batch_size, max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if engine_thread:
            service.scheduler.start()
        yield
        if engine_thread:
            await asyncio.to_thread(service.scheduler.close, shutdown_timeout_s)

    app = FastAPI(title="castspec", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    _routes(app, service)
    _error_handlers(app)
    return app


def _routes(app: FastAPI, service: Service) -> None:
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = parse(CompletionRequest, await request.body())
        service.check_model(body.model)
        return await service.respond(request, body, service.encode_prompt(body.prompt), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = parse(ChatRequest, await request.body())
        service.check_model(body.model)
        return await service.respond(request, body, service.encode_chat(body.messages), chat=True)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": service.created,
                                            "owned_by": "castspec"}]}

    @app.get("/health")
    async def health() -> Response:
        if not service.scheduler.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(service.metrics.render(*service.scheduler.counts()),
                                 media_type="text/plain; version=0.0.4")


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> Response:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> Response:
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        return JSONResponse(ApiError(err.status_code, str(err.detail), type=kind).body(), status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> Response:
        return JSONResponse(ApiError(500, f"{type(err).__name__}: {err}", type="server_error").body(), status_code=500)


# --- running it -------------------------------------------------------------------------------------------------
def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one), or a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as err:
        raise CastspecError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def serve(gen, model_name: str, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 8,
          max_queue: int = 64, shutdown_timeout_s: float = 30.0) -> None:
    """Serve until SIGINT/SIGTERM: the engine loop runs in this (the main) thread, uvicorn in another. A signal stops
    admitting requests; those in flight finish (up to `shutdown_timeout_s`, then 503), then uvicorn closes."""
    import uvicorn

    app = create_app(gen, model_name, max_batch_size, max_queue, shutdown_timeout_s, engine_thread=False)
    sock = listen(host, port)
    bound = sock.getsockname()
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=shutdown_timeout_s)
    server = uvicorn.Server(config)
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="castspec-http", daemon=True)
    scheduler = app.state.service.scheduler
    previous = {sig: signal.signal(sig, lambda signum, frame: scheduler.stop()) for sig in SHUTDOWN_SIGNALS}
    try:
        http.start()
        while not server.started and http.is_alive():
            time.sleep(0.05)
        if not server.started:
            raise CastspecError(f"the HTTP server on {host}:{bound[1]} did not start (see the lines above)")
        print(f"castspec: serving '{model_name}' on http://{host}:{bound[1]} (OpenAI API under /v1; max batch "
              f"{max_batch_size}, queue {max_queue})", file=sys.stderr, flush=True)
        scheduler.run_here(shutdown_timeout_s)  # the engine in the main thread, until a signal and the drain
    finally:
        server.should_exit = True  # then uvicorn closes its connections (the answered streams have ended)
        http.join(timeout=shutdown_timeout_s + 5)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
