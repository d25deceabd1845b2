"""`llama.cpp` as a bench method: plain greedy decoding of the same GGUF file through llama-cpp-python.

A reference point from outside castspec: the Q4_K_M GGUF that castspec's target is converted from (castspec runs
it in its target format: dequantized to float32, re-quantized to int8, or its own blocks with castspec's kernels),
decoded by llama.cpp's own quantized kernels, fed the same prompt token ids, with the
same token budget and EOS ids and the bench's thread count. Its arithmetic differs from ours, so its output may
differ from `ar`'s token for token; the bench reports the agreement and never counts a difference as a failure.

`llama.cpp-spec:n=N` is llama.cpp's own speculative decoding (draft-model chains of up to N tokens, greedy) with the
draft's GGUF: the `llama-speculative-simple` binary built from the same llama.cpp sources, run once per prompt. It
takes a prompt as text, so the prompt ids are turned into text and checked to tokenize back to exactly those ids
(with llama.cpp's own tokenizer) before it runs; it prints text, so its output ids are that text tokenized again.
Its times are the binary's own (prompt processing, decode loop), without process start and model loading.

llama-cpp-python is optional (`pip install 'castspec[llamacpp]'`, see the README for the build flags); nothing
here imports it until the method is used.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from castspec.cost.machine_load import busy_cores
from castspec.errors import CastspecError

PLAIN = "llama.cpp"
SPEC = "llama.cpp-spec"
SPEC_BINARY = "llama-speculative-simple"
SPEC_BINARY_ENV = "CASTSPEC_LLAMA_SPECULATIVE"
LLAMACPP_VERSION = "0.3.36"  # the pinned llama-cpp-python (pyproject's `llamacpp` extra)
INSTALL_HINT = (f"pip install 'castspec[llamacpp]' (llama-cpp-python=={LLAMACPP_VERSION}; build flags in the "
                f"README)")
DIFFERENT_ARITHMETIC = ("llama.cpp decodes the GGUF with its own kernels, castspec the same weights in its target "
                        "format (fp32: dequantized; q4k: the same blocks with castspec's own kernels and rounding "
                        "order): different arithmetic, so differing outputs are expected there and are not a failure "
                        "of exactness")
_CTX_STEP = 1024


def is_llamacpp_method(method: str) -> bool:
    return method == PLAIN or method.startswith(SPEC)


DRAFT_MODEL_TYPE = "draft-simple"  # llama.cpp's --spec-type for draft-model chains
# llama.cpp's draft-free speculation (candidates from the prompt's and output's own n-grams; docs/speculative.md of
# its sources): the counterpart of castspec's `suffix` (no draft model) and of transformers' prompt lookup. These
# three ignore --spec-draft-n-max and propose up to their m-gram size (default 48, past the token budget too), so
# N is passed as that size. (ngram-mod and ngram-cache have other knobs: not offered.)
NGRAM_TYPES = ("ngram-simple", "ngram-map-k", "ngram-map-k4v")


def spec_settings(method: str) -> tuple[int, str, int | None]:
    """N, the speculation type and the n-gram key length of `llama.cpp-spec[:n=N][,type=T][,key=K]` (defaults 4,
    draft-simple: chains from the draft model, and llama.cpp's own key length; T one of NGRAM_TYPES drafts from the
    text itself, without a draft model, looking up the last K tokens)."""
    name, colon, params = method.partition(":")
    n, kind, ngram_key, ok = 4, DRAFT_MODEL_TYPE, None, name == SPEC and (bool(params) or not colon)
    for item in params.split(",") if params else []:
        key, _, value = item.partition("=")
        if key == "n" and value.isdigit():
            n = int(value)
        elif key == "type" and value in (DRAFT_MODEL_TYPE, *NGRAM_TYPES):
            kind = value
        elif key == "key" and value.isdigit() and int(value) >= 1:
            ngram_key = int(value)
        else:
            ok = False
    if not ok or n < 1 or (ngram_key is not None and kind == DRAFT_MODEL_TYPE):
        raise CastspecError(f"bad method {method!r}: write {SPEC}:n=N with N >= 1 draft tokens per step (e.g. "
                            f"{SPEC}:n=4), optionally /type=T for llama.cpp's draft-free speculation, T one of "
                            f"{', '.join(NGRAM_TYPES)}, and with it /key=K to look up the last K tokens (e.g. "
                            f"{SPEC}:n=8/type=ngram-simple/key=3)")
    return n, kind, ngram_key


def spec_needs_draft(method: str) -> bool:
    return spec_settings(method)[1] == DRAFT_MODEL_TYPE


def find_spec_binary(explicit: str | None) -> str:
    """The `llama-speculative-simple` binary: `explicit`, else $CASTSPEC_LLAMA_SPECULATIVE, else on PATH."""
    candidate = explicit or os.environ.get(SPEC_BINARY_ENV) or shutil.which(SPEC_BINARY)
    if not candidate:
        raise CastspecError(f"method {SPEC} needs llama.cpp's {SPEC_BINARY} binary: build it (see the README) and "
                            f"pass --llama-speculative PATH or set {SPEC_BINARY_ENV}")
    path = Path(candidate).expanduser()
    if not path.is_file() or not os.access(path, os.X_OK):
        raise CastspecError(f"--llama-speculative {candidate}: not an executable file")
    return str(path.resolve())


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
    wanted = [m for m in methods if is_llamacpp_method(m)]
    for method in wanted:
        if method != PLAIN:
            spec_settings(method)
    if wanted and temperature > 0:
        raise CastspecError(f"method {wanted[0]} decodes greedily only; drop it or use --temperature 0")


def gguf_for(model: str, explicit: str | None, assemble: bool = True, role: str = "target",
             flag: str = "--gguf") -> dict[str, Any] | None:
    """The GGUF llama.cpp loads for `model`: `explicit` if given, else the built-in model's own GGUF (assembled once
    from its packages, the very file castspec's float32 directory is converted from). `assemble=False` only checks
    that there is one (cheap, for validating the command line before loading anything)."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise CastspecError(f"{flag} {explicit}: no such file")
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise CastspecError(f"{flag} {explicit}: not a GGUF file")
        return {"path": str(path.resolve()), "size": path.stat().st_size, "source": flag}
    from castspec.models.packaged import BUILTIN_MODELS, gguf_info

    if model not in BUILTIN_MODELS:
        raise CastspecError(f"the llama.cpp methods need the {role}'s GGUF file: --{role} {model} is not a built-in "
                            f"model ({', '.join(BUILTIN_MODELS)}), so pass {flag} PATH")
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
        self.reuse_prefix = True  # as llama-cpp-python's own `generate` (and castspec's runner) do
        self.evaluated: list[int] = []  # the tokens in llama.cpp's cache, in order
        self.prefilled_tokens = 0
        self._load(max(n_ctx, _CTX_STEP))

    def _load(self, n_ctx: int) -> None:
        self.close()
        # flash attention on: what llama.cpp's own tools resolve `auto` to on a CPU; everything else default
        # (weight repacking, tiled kernels), i.e. llama.cpp as a user runs it.
        self.llm = self.lib.Llama(model_path=self.gguf["path"], n_ctx=n_ctx, n_batch=512, n_threads=self.threads,
                                  n_threads_batch=self.threads, flash_attn=True, logits_all=False, verbose=False)
        self.n_ctx = n_ctx
        self.n_vocab = int(self.llm.n_vocab())
        self.evaluated = []

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
        load_1m, others = os.getloadavg()[0], busy_cores()
        llm = self.llm
        start = time.perf_counter()
        self._start_from(ids)
        token = self._argmax()
        tokens = [token]
        prefill_end = time.perf_counter()
        while token not in eos_ids and len(tokens) < max_new_tokens:
            llm.eval([token])
            token = self._argmax()
            tokens.append(token)
        end = time.perf_counter()
        self.evaluated = list(ids) + tokens[:-1]
        steps = len(tokens) - 1  # one forward per token after the first, which the prefill gave
        return {"token_ids": [tokens], "new_tokens": len(tokens), "steps": steps,
                "prefill_s": prefill_end - start, "draft_s": 0.0, "verify_s": end - prefill_end,
                "wall_s": end - start, "accepted": [0] * steps, "depths": [0] * steps, "verified": [0] * steps,
                "cached_tokens": [len(ids) - self.prefilled_tokens],
                "load_1m": [round(load_1m, 2)], "busy_cores": [others]}  # lists: one entry per turn

    def forget_prefix(self) -> None:
        """The next prompt runs whole."""
        self.evaluated = []

    def _start_from(self, ids: list[int]) -> None:
        """Run the prompt: only what follows the tokens llama.cpp's cache already holds (never the last one, whose
        logits are needed), as llama-cpp-python's `Llama.generate` does; `eval` drops the cache past `n_tokens`."""
        keep = 0
        if self.reuse_prefix:
            for cached, token in zip(self.evaluated, ids[:-1], strict=False):
                if cached != token:
                    break
                keep += 1
        self.evaluated = []  # until this call completes
        if keep:
            self.llm.n_tokens = keep
        else:
            self.llm.reset()
        self.llm.eval(ids[keep:])
        self.prefilled_tokens = len(ids) - keep

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None


class LlamaCppSpec:
    """llama.cpp's own speculative decoding: one `llama-speculative-simple` run per prompt (greedy, draft chains of
    up to `n_max` tokens), with llama.cpp's tokenizer (vocabulary only) to hand it exactly the prompt ids."""

    _TIMES = re.compile(r"(encoded|decoded)\s+(\d+) tokens in\s+([0-9.]+) seconds")
    _STEP = re.compile(r"accepted (\d+)/(\d+) draft tokens, the last target token is: \((\d+)\)")

    def __init__(self, binary: str, target: dict[str, Any], draft: dict[str, Any] | None, threads: int, n_max: int,
                 spec_type: str = DRAFT_MODEL_TYPE, ngram_key: int | None = None):
        import llama_cpp

        self.binary, self.target, self.draft, self.threads, self.n_max = binary, target, draft, threads, n_max
        self.spec_type, self.ngram_key = spec_type, ngram_key
        self.vocab = llama_cpp.Llama(model_path=target["path"], vocab_only=True, verbose=False)
        try:
            out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
            self.version = (out.stdout + out.stderr).strip().splitlines()[0] if (out.stdout + out.stderr).strip() \
                else "?"
        except (OSError, subprocess.SubprocessError) as e:
            raise CastspecError(f"cannot run {binary} ({e})") from e

    def describe(self) -> dict[str, Any]:
        return {"binary": self.binary, "version": self.version, "target_gguf": self.target, "draft_gguf": self.draft,
                "threads": self.threads, "spec_draft_n_max": self.n_max, "spec_type": self.spec_type,
                "ngram_key": self.ngram_key}

    def command(self, prompt: str, max_new_tokens: int, n_ctx: int) -> list[str]:
        """Its loop stops once it has decoded more than `-n` tokens (a step can take up to n_max + 1 at once), so
        `-n budget-1` stops it at the first step that reaches the budget."""
        t = str(self.threads)
        draft = ["-md", self.draft["path"], "-td", t, "-tbd", t] if self.spec_type == DRAFT_MODEL_TYPE \
            else [f"--spec-{self.spec_type}-size-m", str(self.n_max)]
        if self.ngram_key is not None:
            draft += [f"--spec-{self.spec_type}-size-n", str(self.ngram_key)]
        return [self.binary, "-m", self.target["path"], *draft, "--spec-type", self.spec_type,
                "--spec-draft-n-max", str(self.n_max), "-n", str(max_new_tokens - 1), "-c", str(n_ctx),
                "-b", str(max(n_ctx, 2048)), "-t", t, "-tb", t, "--temp", "0", "--top-k", "1",
                "--seed", "0", "--no-escape", "-lv", "5", "-p", prompt]

    def generate(self, ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> dict[str, Any]:
        text = bytes(self.vocab.detokenize(ids, special=True))
        try:
            prompt = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CastspecError("the prompt's text is not valid UTF-8; llama-speculative-simple takes text") from e
        if list(self.vocab.tokenize(text, add_bos=True, special=True)) != list(ids):
            raise CastspecError("the prompt does not tokenize back to the same ids in llama.cpp; cannot hand it to "
                                "llama-speculative-simple as text")
        n_ctx = -(-(len(ids) + max_new_tokens + self.n_max + 64) // _CTX_STEP) * _CTX_STEP
        load_1m, others = os.getloadavg()[0], busy_cores()
        try:
            run = subprocess.run(self.command(prompt, max_new_tokens, n_ctx), capture_output=True, timeout=3600)
        except subprocess.TimeoutExpired as e:
            raise CastspecError(f"{SPEC_BINARY} took over an hour on one prompt") from e
        err = run.stderr.decode(errors="replace")
        if run.returncode != 0:
            tail = " | ".join(line.strip() for line in err.strip().splitlines()[-3:])
            raise CastspecError(f"{SPEC_BINARY} exited with {run.returncode}: {tail}")
        return {**self.parse(run.stdout, err, text, max_new_tokens), "load_1m": [round(load_1m, 2)],
                "busy_cores": [others]}

    def parse(self, stdout: bytes, stderr: str, prompt: bytes, max_new_tokens: int) -> dict[str, Any]:
        """The record of one run from what the binary printed: stdout = blank line, prompt, generated text, blank
        line; stderr = per-step acceptance (debug log) and the encode/decode times."""
        head = b"\n\n" + prompt
        if not stdout.startswith(head):
            raise CastspecError(f"{SPEC_BINARY} did not echo the prompt as expected; cannot find its output")
        generated = stdout[len(head):]
        generated = generated[:-2] if generated.endswith(b"\n\n") else generated
        times = {kind: (int(n), float(sec)) for kind, n, sec in self._TIMES.findall(stderr)}
        if set(times) != {"encoded", "decoded"}:
            raise CastspecError(f"{SPEC_BINARY} printed no timings (unexpected output format)")
        steps = [(int(a), int(d), int(last)) for a, d, last in self._STEP.findall(stderr)]
        decoded = times["decoded"][0]
        tokens = list(self.vocab.tokenize(generated, add_bos=False, special=True)) if generated else []
        if steps and len(tokens) == decoded - 1:  # it stopped at an end-of-generation token, which it does not print
            tokens.append(steps[-1][2])
        prefill_s, decode_s = times["encoded"][1], times["decoded"][1]
        return {"token_ids": [tokens[:max_new_tokens]], "new_tokens": decoded, "steps": len(steps),
                "prefill_s": prefill_s, "draft_s": 0.0, "verify_s": decode_s, "wall_s": prefill_s + decode_s,
                "accepted": [a for a, _, _ in steps], "depths": [d for _, d, _ in steps],
                "verified": [d + 1 for _, d, _ in steps], "overshoot": [max(decoded - max_new_tokens, 0)]}

    def close(self) -> None:
        self.vocab.close()
