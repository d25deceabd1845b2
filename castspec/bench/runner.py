"""Run several decoding methods on the same prompts, interleaved, and collect comparable numbers.

Methods: `ar` (our loop, plain decoding, same fast kernels as every speculative method), `hf` (stock
`transformers` `generate`, stock kernels: what a user gets out of the box), `hf-assisted` (stock
`generate(assistant_model=draft)`, batch 1 only in transformers), `hf-pld` (stock `generate` with prompt lookup,
`prompt_lookup_num_tokens=10`, batch 1 only), `suffix` / `suffix:POLICY` (castspec without a draft model: CAST, or
POLICY, over trees from the suffix drafter), `POLICY+suffix` (e.g. `cast+suffix`: the draft model's candidates and
the suffix drafter's merged in one tree), `POLICY+lazy` (suffix trees first, the draft model prefilled and merged
in once the steps it could have shortened have cost as much as its prefill), `METHOD@window=N` (METHOD with the
draft model prefilled on each prompt's last N tokens only, e.g. `cast+suffix@window=256`), `llama.cpp` and
`llama.cpp-spec:n=N` (llama.cpp's plain greedy and speculative decoding of the GGUF files, batch 1 only; optional,
see `castspec/bench/llamacpp.py`)
and any tree policy spec
(`chain:gamma=4`, `static`, `eagle2:total_tokens=16`). Prompts are grouped into batches of each requested batch
size (within a task); all methods run one after the other on each group, so slow drift of the machine hits all
of them alike. Each finished group is appended to `records.jsonl` in the output directory, so an interrupted run
can be resumed.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from castspec.bench.datasets import Prompt
from castspec.bench.llamacpp import PLAIN, is_llamacpp_method
from castspec.cost.machine_load import busy_cores
from castspec.cost.profiler import cpu_description, load_or_profile
from castspec.cost.table import OnlineCosts
from castspec.drafters.suffix import SuffixDrafter
from castspec.engine import SpeculativeGenerator, _eos_ids
from castspec.errors import CastspecError
from castspec.policies import make_policy

HF_METHODS = ("hf", "hf-assisted", "hf-pld")
SUFFIX = "suffix"  # `suffix` or `suffix:POLICY`: POLICY (default cast) over suffix-drafter trees, no draft model
PLD_TOKENS = 10  # hf-pld: stock generate(prompt_lookup_num_tokens=10), the prompt-lookup anchor users have today


MIXED = "+suffix"  # `POLICY+suffix`: POLICY over trees merging the draft model's candidates with the suffix drafter's
LAZY = "+lazy"  # `POLICY+lazy`: POLICY over suffix trees first, the draft model joining once it pays (drafters/lazy.py)
WINDOW = "@window="  # `METHOD@window=N`: METHOD with the draft model prefilled on each prompt's last N tokens only


def split_window(method: str) -> tuple[str, int]:
    """A method without its `@window=N` suffix, and N (0: the draft model reads the whole prompt)."""
    base, marker, value = method.partition(WINDOW)
    if not marker:
        return method, 0
    if not value.isdigit() or int(value) < 1:
        raise CastspecError(f"bad method '{method}': {WINDOW}N needs a whole number N >= 1 (tokens of the prompt)")
    return base, int(value)


def mixed_policy(method: str) -> str | None:
    """The policy spec of a `POLICY+suffix` method (draft model and suffix candidates in one tree), else None."""
    method = split_window(method)[0]
    return method[: -len(MIXED)] if method.endswith(MIXED) and len(method) > len(MIXED) else None


def lazy_policy(method: str) -> str | None:
    """The policy spec of a `POLICY+lazy` method (the draft model bought once it pays), else None."""
    method = split_window(method)[0]
    return method[: -len(LAZY)] if method.endswith(LAZY) and len(method) > len(LAZY) else None


def policy_spec(method: str) -> str:
    """The tree policy a castspec method runs (`cast` for `suffix`, `cast` for `cast+suffix@window=256`, ...)."""
    return suffix_policy(method) or mixed_policy(method) or lazy_policy(method) or split_window(method)[0]


def suffix_policy(method: str) -> str | None:
    """The policy spec of a `suffix[:POLICY]` method (target-only speculation), else None."""
    method = split_window(method)[0]
    if method == SUFFIX:
        return "cast"
    if method.startswith(SUFFIX + ":"):
        return method[len(SUFFIX) + 1:]
    return None


def batch1_only(method: str) -> str | None:
    """Why `method` cannot decode a batch of prompts together, if it cannot."""
    if method in ("hf-assisted", "hf-pld"):
        return "transformers' assisted generation (and prompt lookup) supports batch size 1 only"
    if is_llamacpp_method(method):
        return f"the {method} method decodes one prompt at a time (batch size 1 only)"
    return None


def is_policy(method: str) -> bool:
    """True for castspec's own methods (a policy spec), False for the outside baselines (hf, llama.cpp)."""
    return method not in HF_METHODS and not is_llamacpp_method(method)
RECORDS_FILE = "records.jsonl"


@dataclass
class BenchConfig:
    target: str
    draft: str | None
    methods: list[str]
    max_new_tokens: int = 128
    device: str = "cpu"
    draft_quant: str = "auto"
    target_dtype: str = "auto"
    warmup: bool = True
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    cost_table: str | None = None
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    datasets: list[str] = field(default_factory=list)
    num_prompts: int = 0
    gguf: str | None = None  # the llama.cpp methods' GGUF of the target (default: the built-in target's own)
    draft_gguf: str | None = None  # llama.cpp-spec's draft GGUF (default: the built-in draft's own)
    llama_speculative: str | None = None  # llama.cpp-spec's binary (not part of the fingerprint: a tool's path)
    reuse_prefix: bool = True  # a conversation's later turns prefill only what they add (castspec and llama.cpp)

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a resumed run to continue the same measurement."""
        keep = ("target", "draft", "methods", "max_new_tokens", "device", "draft_quant", "temperature", "top_k",
                "top_p", "seed", "batch_sizes", "datasets", "num_prompts")
        out = {k: v for k, v in asdict(self).items() if k in keep}
        if self.target_dtype != "fp32":  # runs recorded before formats existed were fp32 and stay resumable
            out["target_dtype"] = self.target_dtype
        if self.gguf:
            out["gguf"] = self.gguf
        if self.draft_gguf:
            out["draft_gguf"] = self.draft_gguf
        if not self.reuse_prefix:  # records from before prefixes were reused prefilled every turn whole
            out["reuse_prefix"] = False
        return out


@dataclass
class Group:
    """Prompts decoded together as one batch (a single prompt at batch size 1)."""

    id: str
    task: str
    batch_size: int
    prompts: list[Prompt]


def make_groups(prompts: list[Prompt], batch_sizes: list[int]) -> list[Group]:
    """Consecutive prompts of one task form a batch; every batch size sees the same prompts."""
    groups = []
    for batch in batch_sizes:
        for task in dict.fromkeys(p.task for p in prompts):
            pool = [p for p in prompts if p.task == task]
            for start in range(0, len(pool), batch):
                chunk = pool[start:start + batch]
                name = chunk[0].id if batch == 1 else f"B{batch}:{chunk[0].id}+{len(chunk) - 1}"
                groups.append(Group(id=name, task=task, batch_size=batch, prompts=chunk))
    return groups


class RssSampler:
    """Resident memory of this process, sampled in the background (MB): peak since the last reset.

    `rss` is what `ps` shows, including the model files mapped from disk (page cache shared with the OS);
    `anon` excludes those mapped files: the memory the process itself allocated (KV caches, activations, packed
    weights). A leak shows up in `anon`.
    """

    def __init__(self, interval_s: float = 0.25):
        self.interval_s = interval_s
        self.peak = self.current()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    @staticmethod
    def current() -> dict[str, float]:
        try:
            import resource

            fields = Path("/proc/self/statm").read_text().split()
            page = resource.getpagesize() / 2**20
            return {"rss": int(fields[1]) * page, "anon": (int(fields[1]) - int(fields[2])) * page}
        except (OSError, ValueError, IndexError, ImportError):
            return {"rss": 0.0, "anon": 0.0}

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            now = self.current()
            self.peak = {key: max(self.peak[key], now[key]) for key in now}

    def reset(self) -> dict[str, float]:
        self.peak = self.current()
        return self.peak

    def close(self) -> None:
        self._stop.set()


class MethodRunner:
    """Holds the loaded models once and runs any method on a group of prompts."""

    def __init__(self, config: BenchConfig):
        from castspec.api import load_generator
        from castspec.bench.llamacpp import check_llamacpp_settings, require_llamacpp
        from castspec.models.load import load_model

        self.config = config
        self.load_at_start = os.getloadavg()  # before our own model loading adds to it
        self.busy_at_start = None
        for method in config.methods:
            if is_policy(method):
                make_policy(policy_spec(method))  # fail early on a bad name
        require_llamacpp(config.methods)
        check_llamacpp_settings(config.methods, config.temperature)
        needs_draft = any(m == "hf-assisted" or (is_policy(m) and suffix_policy(m) is None
                                                 and make_policy(policy_spec(m)).uses_draft)
                          for m in config.methods)
        base = load_generator(config.target, config.draft if needs_draft else None,
                              "chain" if needs_draft else "ar", device=config.device, draft_quant=config.draft_quant,
                              target_dtype=config.target_dtype)
        self.tokenizer = base.tokenizer
        runtimes = base.runtimes  # one runtime (model, kernels, runner, KV cache) per model, shared by every method
        self.target_model = runtimes["target"].model
        self.draft_model = runtimes["draft"].model if "draft" in runtimes else None
        self.eos_ids = _eos_ids(self.target_model, self.tokenizer)
        policies = {m: make_policy(policy_spec(m)) for m in config.methods if is_policy(m)}
        no_draft = config.draft is None or config.draft.strip().lower() == "none"  # speculate on the text alone
        table = None
        if any(getattr(p, "needs_costs", False) for p in policies.values()):
            table = load_or_profile(runtimes, path=config.cost_table, max_batch_size=max(config.batch_sizes))
        self.generators = {
            m: SpeculativeGenerator(runtimes["target"], self.tokenizer,
                                    SuffixDrafter(self.target_model.device) if suffix_policy(m) or no_draft
                                    else runtimes.get("draft"),
                                    p, costs=OnlineCosts(table) if table else None, suffix=bool(mixed_policy(m)),
                                    draft_window=split_window(m)[1], lazy_draft=bool(lazy_policy(m)))
            for m, p in policies.items()}
        self.stock_target = self.stock_draft = None
        if any(m in HF_METHODS for m in config.methods):
            self.stock_target, _ = load_model(config.target, device=config.device)
        if "hf-assisted" in config.methods:
            if no_draft:
                raise CastspecError("hf-assisted needs a draft model (--draft MODEL)")
            self.stock_draft, _ = load_model(config.draft, device=config.device)
        self.llamacpp = None
        self.llamacpp_spec: dict[str, Any] = {}
        if any(is_llamacpp_method(m) for m in config.methods):
            from castspec.bench.llamacpp import (
                DRAFT_MODEL_TYPE,
                LlamaCppPlain,
                LlamaCppSpec,
                find_spec_binary,
                gguf_for,
                spec_settings,
            )

            threads = torch.get_num_threads()
            self.busy_at_start = busy_cores(1.0)
            if (self.busy_at_start or 0) >= 0.3 and threads >= (os.cpu_count() or 1):
                print(f"castspec: warning: other processes keep {self.busy_at_start:.1f} of {os.cpu_count()} cores "
                      f"busy; llama.cpp with {threads} threads stalls when another process shares the cores, so its "
                      f"numbers may be far too low (each run records this)", file=sys.stderr)
            target_gguf = gguf_for(config.target, config.gguf)
            if PLAIN in config.methods:
                self.llamacpp = LlamaCppPlain(target_gguf, threads=threads)
            spec_methods = [m for m in config.methods if is_llamacpp_method(m) and m != PLAIN]
            if spec_methods:
                binary = find_spec_binary(config.llama_speculative)
                settings = {m: spec_settings(m) for m in spec_methods}  # (N, type, key)
                drafting = {m for m, (_, kind, _) in settings.items() if kind == DRAFT_MODEL_TYPE}
                draft_gguf = gguf_for(config.draft, config.draft_gguf, role="draft", flag="--draft-gguf") \
                    if drafting else None
                self.llamacpp_spec = {m: LlamaCppSpec(binary, target_gguf, draft_gguf if m in drafting else None,
                                                      threads, *settings[m]) for m in spec_methods}

    def close(self) -> None:
        """Free what is not Python-managed (llama.cpp's model and context)."""
        if self.llamacpp is not None:
            self.llamacpp.close()
            self.llamacpp = None
        for spec in self.llamacpp_spec.values():
            spec.close()
        self.llamacpp_spec = {}

    def encode(self, prompt: Prompt, history: list[dict[str, str]] | None = None) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, history)

    def forget_prefixes(self) -> None:
        """Every method starts a prompt from empty caches: the models' runtimes are shared, and another method's
        run (or the warm-up) of the same prompt must not shorten its prefill. Later turns of one conversation do
        reuse their own earlier turns, in castspec's methods and llama.cpp's alike (`BenchConfig.reuse_prefix`)."""
        for generator in self.generators.values():
            generator.forget_prefix()
            generator.reuse_prefix = self.config.reuse_prefix
        if self.llamacpp is not None:
            self.llamacpp.forget_prefix()
            self.llamacpp.reuse_prefix = self.config.reuse_prefix

    def run_group(self, method: str, prompts: list[Prompt], max_new_tokens: int) -> dict[str, Any]:
        """Every turn of every prompt; a conversation's later turns see this method's own earlier answers."""
        self.forget_prefixes()
        histories: list[list[dict[str, str]]] = [[] for _ in prompts]
        total: dict[str, Any] = {"token_ids": [[] for _ in prompts], "turn_tokens": [[] for _ in prompts],
                                 "prompt_tokens": [[] for _ in prompts], "wall_s": 0.0, "new_tokens": 0}
        turns = [len(p.turns) if p.chat else 1 for p in prompts]
        for turn in range(max(turns)):
            rows = [i for i, count in enumerate(turns) if turn < count]
            ids = [self.encode(prompts[i], histories[i]) for i in rows]
            rec = self.run(method, ids, max_new_tokens)
            for key, value in rec.items():
                if key != "token_ids":
                    total[key] = total.get(key, type(value)()) + value
            for i, tokens, prompt_ids in zip(rows, rec["token_ids"], ids, strict=True):
                total["token_ids"][i] += tokens
                total["turn_tokens"][i].append(len(tokens))
                total["prompt_tokens"][i].append(len(prompt_ids))
                answer = self.tokenizer.decode(tokens, skip_special_tokens=True)
                histories[i] += [{"role": "user", "content": prompts[i].turns[turn]},
                                 {"role": "assistant", "content": answer}]
        return total

    def run(self, method: str, ids: list[list[int]], max_new_tokens: int) -> dict[str, Any]:
        """One batch of prompts (token ids) -> per-row new tokens, the batch's wall time, per-step statistics."""
        if method in HF_METHODS:
            return self._run_hf(method, ids, max_new_tokens)
        if is_llamacpp_method(method):
            if len(ids) > 1:
                raise CastspecError(batch1_only(method))
            decoder = self.llamacpp if method == PLAIN else self.llamacpp_spec[method]
            return decoder.generate(ids[0], max_new_tokens, self.eos_ids)
        c = self.config
        results = self.generators[method].generate_batch(ids, max_new_tokens=max_new_tokens,
                                                         temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
                                                         seed=c.seed)
        stats = [r.stats for r in results]
        batch = results[0].batch_stats  # the whole call; sequence 0's own stats stop when it finishes
        return {"token_ids": [r.token_ids for r in results], "new_tokens": sum(len(r.token_ids) for r in results),
                "steps": batch.steps, "prefill_s": batch.prefill_s, "draft_s": batch.draft_s,
                "verify_s": batch.verify_s, "wall_s": batch.wall_s,
                "cached_tokens": [s.cached_tokens for s in stats],  # per row: prompt tokens a kept prefix held
                "accepted": [a for s in stats for a in s.accepted], "depths": [d for s in stats for d in s.depths],
                "verified": [v for s in stats for v in s.verified]}

    @torch.inference_mode()
    def _run_hf(self, method: str, ids: list[list[int]], max_new_tokens: int) -> dict[str, Any]:
        c = self.config
        if method in ("hf-assisted", "hf-pld") and len(ids) > 1:
            raise CastspecError(batch1_only(method))
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else min(self.eos_ids)
        longest = max(len(row) for row in ids)
        device = self.stock_target.device
        input_ids = torch.tensor([[pad] * (longest - len(row)) + row for row in ids], device=device)
        attention_mask = torch.tensor([[0] * (longest - len(row)) + [1] * len(row) for row in ids], device=device)
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, attention_mask=attention_mask, pad_token_id=pad)
        if c.temperature > 0:
            torch.manual_seed(c.seed)
            kwargs.update(do_sample=True, temperature=c.temperature, top_k=c.top_k or None, top_p=c.top_p)
        else:
            kwargs.update(do_sample=False)
        if method == "hf-assisted":
            kwargs["assistant_model"] = self.stock_draft
        if method == "hf-pld":
            kwargs["prompt_lookup_num_tokens"] = PLD_TOKENS
        start = time.perf_counter()
        out = self.stock_target.generate(input_ids, **kwargs)
        wall = time.perf_counter() - start
        rows = [self._cut_at_eos(row) for row in out[:, longest:].tolist()]
        return {"token_ids": rows, "wall_s": wall, "new_tokens": sum(len(r) for r in rows)}

    def _cut_at_eos(self, tokens: list[int]) -> list[int]:
        """generate pads finished rows; keep up to and including the first EOS, as our loop does."""
        for i, token in enumerate(tokens):
            if token in self.eos_ids:
                return tokens[: i + 1]
        return tokens

    def divergence(self, prompt_ids: list[int], reference: list[int], other: list[int],
                   first_turn_tokens: int) -> dict[str, Any] | None:
        """Where `other` first differs from `reference` (plain decoding), and how close the target's call was."""
        index = next((i for i, (a, b) in enumerate(zip(reference, other, strict=False)) if a != b), None)
        if index is None:
            if len(reference) == len(other):
                return None
            index = min(len(reference), len(other))  # one stopped (EOS) where the other went on
            return {"index": index, "ar_token": None, "other_token": None, "logit_gap": None}
        if index >= first_turn_tokens:  # in a later turn: the prompt differs too, report the position only
            return {"index": index, "ar_token": reference[index], "other_token": other[index], "logit_gap": None}
        prefix = torch.tensor([prompt_ids + reference[:index]], dtype=torch.long, device=self.target_model.device)
        with torch.inference_mode():
            logits = self.target_model(prefix, logits_to_keep=1).logits[0, -1].float()
        gap = float(logits[reference[index]] - logits[other[index]])
        return {"index": index, "ar_token": reference[index], "other_token": other[index], "logit_gap": round(gap, 5)}


def encode_prompt(tokenizer, prompt: Prompt, history: list[dict[str, str]] | None = None) -> list[int]:
    """Token ids of a prompt's first turn, or of the whole conversation so far plus the next user turn."""
    if not prompt.chat:
        return list(tokenizer(prompt.turns[0])["input_ids"])
    messages = (history or []) + [{"role": "user", "content": prompt.turns[len(history or []) // 2]}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def run_bench(config: BenchConfig, prompts: list[Prompt], out_dir: Path | None = None, resume: bool = False,
              on_group: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Measure every method on every group; append each finished group to `out_dir/records.jsonl`.

    With `resume`, groups already in that file (from a run with the same configuration) are kept and skipped.
    `on_group(results)` is called after each group with the results so far (to keep the report current).
    """
    if not prompts:
        raise CastspecError("no prompts selected")
    groups = make_groups(prompts, config.batch_sizes)
    done, starts = _load_records(out_dir, config, resume)
    todo = [g for g in groups if g.id not in done]
    runner = MethodRunner(config)
    try:
        return _run_groups(runner, config, prompts, groups, done, starts, todo, out_dir, on_group)
    finally:
        runner.close()


def _run_groups(runner: MethodRunner, config: BenchConfig, prompts: list[Prompt], groups: list[Group],
                done: dict[str, Any], starts: list[dict], todo: list[Group], out_dir: Path | None,
                on_group: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    env = environment(runner)
    starts.append({"started": env["date"], "environment": env, "groups_done_before": len(done)})
    log = _open_log(out_dir, config, env, fresh=not done)
    if config.warmup and todo:
        warm = runner.encode(todo[0].prompts[0])
        for method in config.methods:
            try:
                runner.run(method, [warm], 4)
            except Exception:  # reported properly in the real run
                pass
    if any(p.chat for p in prompts) and not getattr(runner.tokenizer, "chat_template", None):
        raise CastspecError("these prompts need a chat template, and the target's tokenizer has none")
    rss = RssSampler()
    bar = tqdm(total=len(todo) * len(config.methods), desc="bench", unit="run")
    try:
        for group in todo:
            record = {**_measure_group(runner, group, config, rss, bar), "session": len(starts) - 1}
            done[group.id] = record
            if log is not None:
                log.write(json.dumps({"group": record}) + "\n")
                log.flush()
            if on_group is not None:
                on_group(assemble(config, env, groups, done, starts, complete=False))
    finally:
        bar.close()
        rss.close()
        if log is not None:
            log.close()
    return assemble(config, env, groups, done, starts, complete=True)


def report_from_records(config: BenchConfig, prompts: list[Prompt], out_dir: Path) -> dict[str, Any]:
    """Results assembled from `out_dir/records.jsonl` alone, without loading a model.

    Why: to re-render the report after a change to it, or to look at a long run while it is still going.
    The settings must match the run's, as for `--resume`, so the groups line up with the records.
    """
    if not (out_dir / RECORDS_FILE).is_file():
        raise CastspecError(f"--report-only: no {RECORDS_FILE} in {out_dir}; run the benchmark there first")
    groups = make_groups(prompts, config.batch_sizes)
    done, starts = _load_records(out_dir, config, resume=True)
    if not starts:
        raise CastspecError(f"--report-only: {out_dir / RECORDS_FILE} has no run header; it is not a bench log")
    env = starts[-1].get("environment") or {}
    return assemble(config, env, groups, done, starts, complete=all(g.id in done for g in groups))


def _measure_group(runner: MethodRunner, group: Group, config: BenchConfig, rss: RssSampler,
                   bar: tqdm) -> dict[str, Any]:
    per_method: dict[str, dict[str, Any]] = {}
    for method in config.methods:
        bar.set_postfix_str(f"{group.id} {method}")
        before = rss.reset()
        if batch1_only(method) and group.batch_size > 1:
            per_method[method] = {"skipped": batch1_only(method)}
        else:
            try:
                per_method[method] = runner.run_group(method, group.prompts, config.max_new_tokens)
            except Exception as err:  # one failing method must not lose the whole run
                per_method[method] = {"error": f"{type(err).__name__}: {err}",
                                      "traceback": traceback.format_exc(limit=3)}
        after = rss.current()
        per_method[method]["rss_mb"] = {f"{when}_{key}": round(value) for when, snapshot in
                                        (("before", before), ("peak", rss.peak), ("after", after))
                                        for key, value in snapshot.items()}
        bar.update(1)
    reference = per_method.get("ar", {}).get("token_ids") if config.temperature == 0 else None
    for method, rec in per_method.items():
        if reference is None or "token_ids" not in rec or method == "ar":
            continue
        rec["identical_to_ar"] = [a == b for a, b in zip(reference, rec["token_ids"], strict=True)]
        rec["divergences"] = []
        for row, same in enumerate(rec["identical_to_ar"]):
            if not same:
                first_turn = per_method["ar"]["turn_tokens"][row][0]
                prompt_ids = runner.encode(group.prompts[row])
                found = runner.divergence(prompt_ids, reference[row], rec["token_ids"][row], first_turn)
                rec["divergences"].append({"prompt": group.prompts[row].id, **(found or {})})
    return {"group": group.id, "task": group.task, "batch_size": group.batch_size,
            "prompts": [p.id for p in group.prompts], "methods": per_method}


def _load_records(out_dir: Path | None, config: BenchConfig, resume: bool) -> tuple[dict[str, Any], list[dict]]:
    """Groups finished by an earlier, interrupted run with the same configuration."""
    path = out_dir / RECORDS_FILE if out_dir is not None else None
    if not resume or path is None or not path.is_file():
        return {}, []
    done: dict[str, Any] = {}
    starts: list[dict] = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
        except ValueError:
            if number == len(lines):
                break  # the last line of an interrupted write
            raise CastspecError(f"{path}:{number}: not a JSON line; delete the file to start over") from None
        if "config" in entry:
            if entry["config"] != config.fingerprint():
                changed = sorted(k for k in entry["config"] if entry["config"][k] != config.fingerprint().get(k))
                raise CastspecError(f"--resume: {path} is from a run with different settings ({', '.join(changed)});"
                                    " use another --out or drop --resume")
            starts.append({"started": entry.get("started"), "environment": entry.get("environment")})
        elif "group" in entry:  # measured in the session whose config line precedes it
            done[entry["group"]["group"]] = {"session": max(len(starts) - 1, 0), **entry["group"]}
    return done, starts


def _open_log(out_dir: Path | None, config: BenchConfig, env: dict[str, Any], fresh: bool):
    if out_dir is None:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    log = (out_dir / RECORDS_FILE).open("w" if fresh else "a")
    log.write(json.dumps({"config": config.fingerprint(), "started": env["date"], "environment": env}) + "\n")
    log.flush()
    return log


def assemble(config: BenchConfig, env: dict[str, Any], groups: list[Group], done: dict[str, Any],
             starts: list[dict], complete: bool) -> dict[str, Any]:
    """Results in the order the groups were planned: summaries per batch size, overall and per task."""
    records = [done[g.id] for g in groups if g.id in done]
    by_batch: dict[str, Any] = {}
    for batch in config.batch_sizes:
        recs = [r for r in records if r["batch_size"] == batch]
        if not recs:
            continue
        tasks = list(dict.fromkeys(r["task"] for r in recs))
        by_batch[str(batch)] = {"summary": summarize(recs, config.methods),
                                "by_task": {t: summarize([r for r in recs if r["task"] == t], config.methods)
                                            for t in tasks}}
    first = next(iter(by_batch.values()), {"summary": {}, "by_task": {}})
    return {"config": asdict(config), "environment": env, "sessions": starts, "complete": complete,
            "groups_done": len(records), "groups_planned": len(groups),
            "summary": first["summary"], "by_task": first["by_task"], "by_batch_size": by_batch,
            "records": records}


def summarize(records: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Per method: throughput over all groups, acceptance statistics, agreement with `ar`, failures."""
    summary: dict[str, Any] = {}
    for method in methods:
        recs = [r for r in records if method in r["methods"] and "skipped" not in r["methods"][method]]
        if not recs:
            continue
        ok = [r["methods"][method] for r in recs if "error" not in r["methods"][method]]
        failed = [{"group": r["group"], "error": r["methods"][method]["error"]}
                  for r in recs if "error" in r["methods"][method]]
        tokens = sum(rec["new_tokens"] for rec in ok)
        wall = sum(rec["wall_s"] for rec in ok)
        entry: dict[str, Any] = {"prompts": sum(len(r["prompts"]) for r in recs if "error" not in r["methods"][method]),
                                 "failed": failed, "new_tokens": tokens, "wall_s": round(wall, 3),
                                 "tokens_per_s": round(tokens / wall, 4) if wall else 0.0}
        steps = sum(rec.get("steps", 0) for rec in ok)
        if steps:
            accepted = [a for rec in ok for a in rec["accepted"]]
            depths = [d for rec in ok for d in rec["depths"]]
            verified = [v for rec in ok for v in rec["verified"]]
            entry["steps"] = steps
            entry["mean_accept_len"] = round((sum(accepted) + len(accepted)) / len(accepted), 4)
            entry["mean_verified_nodes"] = round(sum(verified) / len(verified), 3)
            entry["mean_depth"] = round(sum(depths) / len(depths), 3)
            entry["acceptance_by_position"] = [
                round(sum(a >= k for a, d in zip(accepted, depths, strict=True) if d >= k)
                      / max(sum(d >= k for d in depths), 1), 4)
                for k in range(1, max(depths, default=0) + 1)]
            entry["accept_len_histogram"] = {str(n): accepted.count(n) for n in sorted(set(accepted))}
            entry["draft_s"] = round(sum(rec["draft_s"] for rec in ok), 3)
            entry["verify_s"] = round(sum(rec["verify_s"] for rec in ok), 3)
            if all("prefill_s" in rec for rec in ok):  # records from before prefill was recorded lack it
                entry["prefill_s"] = round(sum(rec["prefill_s"] for rec in ok), 3)
            # Prefill (and per-turn setup) is work speculation cannot shorten; on long prompts it caps the
            # end-to-end speedup, so the decode phase is reported on its own as well.
            decode_s = entry["draft_s"] + entry["verify_s"]
            entry["decode_tokens_per_s"] = round(tokens / decode_s, 4) if decode_s else 0.0
            entry["outside_decode_share"] = round(1 - decode_s / wall, 4) if wall else 0.0
        identical = [same for rec in ok for same in rec.get("identical_to_ar", [])]
        if identical:
            entry["identical_to_ar"] = round(sum(identical) / len(identical), 4)
            entry["divergences"] = [d for rec in ok for d in rec.get("divergences", [])]
        rss = [r["methods"][method].get("rss_mb") for r in recs if r["methods"][method].get("rss_mb")]
        if rss:
            entry["peak_rss_mb"] = max(x["peak_rss"] for x in rss)
            entry["peak_anon_mb"] = max(x["peak_anon"] for x in rss)
            entry["anon_after_mb"] = [x["after_anon"] for x in rss]  # flat across runs: nothing accumulates
        summary[method] = entry
    for base in ("ar", "hf"):
        if base in summary and summary[base]["tokens_per_s"]:
            for entry in summary.values():
                entry[f"speedup_vs_{base}"] = round(entry["tokens_per_s"] / summary[base]["tokens_per_s"], 4)
    if summary.get("ar", {}).get("decode_tokens_per_s"):
        for entry in summary.values():
            if entry.get("decode_tokens_per_s"):
                entry["decode_speedup_vs_ar"] = round(entry["decode_tokens_per_s"]
                                                      / summary["ar"]["decode_tokens_per_s"], 4)
    return summary


def environment(runner: MethodRunner) -> dict[str, Any]:
    import transformers

    from castspec.models.kernels import describe_kernels
    from castspec.models.load import model_identity

    config = runner.config
    env = {"device": config.device, "cpu": cpu_description(), "threads": torch.get_num_threads(),
           "cores": os.cpu_count(), "load_avg": [round(x, 2) for x in runner.load_at_start],
           "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "target": model_identity(config.target), "target_kernels": describe_kernels(runner.target_model),
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": _git_commit()}
    if runner.draft_model is not None:
        env["draft"] = model_identity(config.draft)
        env["draft_kernels"] = describe_kernels(runner.draft_model)
    if runner.busy_at_start is not None:
        env["busy_cores"] = runner.busy_at_start
    if runner.llamacpp is not None:
        env["llamacpp"] = runner.llamacpp.describe()
    if runner.llamacpp_spec:
        env["llamacpp_spec"] = {method: spec.describe() for method, spec in runner.llamacpp_spec.items()}
    return env


def _git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
