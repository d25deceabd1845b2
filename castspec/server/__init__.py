"""`castspec serve`: an OpenAI-compatible HTTP server with continuous batching.

    scheduler.py  the engine thread: a bounded queue, admission between steps, per-request delivery and cancellation
    protocol.py   request validation and OpenAI's response shapes
    metrics.py    /metrics in the Prometheus text format
    app.py        the FastAPI app (`create_app`) and `serve`, which runs it under uvicorn

Incremental detokenization and stop strings are `castspec.text` (the engine's `generate(stop=...)` uses them too).
"""

from castspec.server.app import create_app, serve

__all__ = ["create_app", "serve"]
