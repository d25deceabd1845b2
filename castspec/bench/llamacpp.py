"""`llama.cpp` as a bench method: plain greedy decoding of the same GGUF file through llama-cpp-python.

A reference point from outside castspec: the Q4_K_M GGUF that castspec's target is converted from (castspec runs
it dequantized to float32), decoded by llama.cpp's own quantized kernels, fed the same prompt token ids, with the
same token budget and EOS ids and the bench's thread count. Its arithmetic differs from ours, so its output may
differ from `ar`'s token for token; the bench reports the agreement and never counts a difference as a failure.

llama-cpp-python is optional (`pip install 'castspec[llamacpp]'`, see the README for the build flags); nothing
here imports it until the method is used.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from castspec.errors import CastspecError

PLAIN = "llama.cpp"
LLAMACPP_VERSION = "0.3.36"  # the pinned llama-cpp-python (pyproject's `llamacpp` extra)
INSTALL_HINT = (f"pip install 'castspec[llamacpp]' (llama-cpp-python=={LLAMACPP_VERSION}; build flags in the "
                f"README)")
DIFFERENT_ARITHMETIC = ("llama.cpp decodes the GGUF with its own quantized kernels, castspec the same weights "
                        "dequantized to float32: different arithmetic, so differing outputs are expected there and "
                        "are not a failure of exactness")
_CTX_STEP = 1024


def is_llamacpp_method(method: str) -> bool:
    return method == PLAIN


def require_llamacpp(methods: list[str]) -> None:
    """Fail up front (one line) when a llama.cpp method is asked for and llama-cpp-python is not installed."""
    wanted = [m for m in methods if is_llamacpp_method(m)]
    if not wanted:
        return
    try:
        import llama_cpp  # noqa: F401  (loads its shared libraries: a broken build fails here, not mid-run)
    except ModuleNotFoundError as e:
        if e.name != "llama_cpp":  # one of its own dependencies is missing
            raise CastspecError(f"method {wanted[0]}: llama-cpp-python cannot be imported ({e}); {INSTALL_HINT}") from e
        raise CastspecError(f"method {wanted[0]} needs llama-cpp-python, which is not installed: {INSTALL_HINT}") from e
    except (ImportError, OSError) as e:
        raise CastspecError(f"method {wanted[0]}: llama-cpp-python cannot be imported ({e}); {INSTALL_HINT}") from e


def check_llamacpp_settings(methods: list[str], temperature: float) -> None:
    if any(is_llamacpp_method(m) for m in methods) and temperature > 0:
        raise CastspecError("method llama.cpp decodes greedily only; drop it or use --temperature 0")


def gguf_for(model: str, explicit: str | None, assemble: bool = True) -> dict[str, Any] | None:
    """The GGUF llama.cpp loads for `model`: `explicit` if given, else the built-in model's own GGUF (assembled once
    from its packages, the very file castspec's float32 directory is converted from). `assemble=False` only checks
    that there is one (cheap, for validating the command line before loading anything)."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise CastspecError(f"--gguf {explicit}: no such file")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise CastspecError(f"--gguf {explicit}: not a GGUF file")
        return {"path": str(path.resolve()), "size": path.stat().st_size, "source": "--gguf"}
    from castspec.models.packaged import BUILTIN_MODELS, gguf_info

    if model not in BUILTIN_MODELS:
        raise CastspecError(f"method llama.cpp needs the target's GGUF file: --target {model} is not a built-in "
                            f"model ({', '.join(BUILTIN_MODELS)}), so pass --gguf PATH")
    if not assemble:
        return None
    info = gguf_info(model)
    return {"path": info["path"], "size": info["size"], "sha256": info["sha256"], "source": f"built-in {model}"}


class LlamaCppPlain:
    """One llama.cpp model and context, loaded once per bench process; `generate` decodes one prompt greedily."""

    def __init__(self, gguf: dict[str, Any], threads: int, n_ctx: int = 4096):
        import llama_cpp

        self.lib = llama_cpp
        self.gguf, self.threads = gguf, threads
        self.llm = None
        self._load(max(n_ctx, _CTX_STEP))

    def _load(self, n_ctx: int) -> None:
        self.close()
        # flash attention on: what llama.cpp's own tools resolve `auto` to on a CPU; everything else default
        # (weight repacking, tiled kernels), i.e. llama.cpp as a user runs it.
        self.llm = self.lib.Llama(model_path=self.gguf["path"], n_ctx=n_ctx, n_batch=512, n_threads=self.threads,
                                  n_threads_batch=self.threads, flash_attn=True, logits_all=False, verbose=False)
        self.n_ctx = n_ctx
        self.n_vocab = int(self.llm.n_vocab())

    def describe(self) -> dict[str, Any]:
        info = {"llama_cpp_python": getattr(self.lib, "__version__", "?"), "gguf": self.gguf,
                "threads": self.threads, "flash_attn": True, "n_ctx": self.n_ctx}
        try:
            info["system_info"] = self.lib.llama_print_system_info().decode(errors="replace").strip()
        except Exception:  # only informative
            pass
        return info

    def _argmax(self) -> int:
        import numpy as np

        logits = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))
        return int(logits.argmax())

    def generate(self, ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> dict[str, Any]:
        """Greedy decoding of one prompt: prefill (the prompt's forward, giving the first token), then one forward
        per token until an EOS id or the budget. The record has the fields of castspec's plain decoding (`ar`)."""
        need = len(ids) + max_new_tokens
        if need > self.n_ctx:  # grow the context (outside the timed part), in whole steps
            self._load(-(-need // _CTX_STEP) * _CTX_STEP)
        load_1m = os.getloadavg()[0]
        llm = self.llm
        start = time.perf_counter()
        llm.reset()
        llm.eval(ids)
        token = self._argmax()
        tokens = [token]
        prefill_end = time.perf_counter()
        while token not in eos_ids and len(tokens) < max_new_tokens:
            llm.eval([token])
            token = self._argmax()
            tokens.append(token)
        end = time.perf_counter()
        steps = len(tokens) - 1  # one forward per token after the first, which the prefill gave
        return {"token_ids": [tokens], "new_tokens": len(tokens), "steps": steps,
                "prefill_s": prefill_end - start, "draft_s": 0.0, "verify_s": end - prefill_end,
                "wall_s": end - start, "accepted": [0] * steps, "depths": [0] * steps, "verified": [0] * steps,
                "load_1m": [round(load_1m, 2)]}  # a list: a conversation's turns add up to one per turn

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None
