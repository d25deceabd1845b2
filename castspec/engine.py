"""The one decode loop: draft a tree, verify it with the target in one forward, keep the accepted path.

Every method — plain decoding (`ar`), chain, static trees, EAGLE-2, CAST — runs through `SpeculativeGenerator`;
only the policy differs. A step is:

    policy.begin_step  -> the drafter expands the tree level by level as the policy chooses
    policy.select      -> the target verifies root + selected nodes in one forward (tree mask, depth positions)
    verify             -> accepted path + bonus token (greedy or sampled); both KV caches keep exactly that path
    policy.observe     -> timings and acceptance, for policies that learn online
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from castspec.cost.table import OnlineCosts
from castspec.draft import DraftLM
from castspec.drafters.base import Drafter
from castspec.drafters.lazy import LazyDraft
from castspec.drafters.suffix import MixedDrafter, SuffixDrafter
from castspec.errors import CastspecError
from castspec.policies import StepContext, StepRecord, TreePolicy, make_policy
from castspec.policies.base import check_children_fit
from castspec.runtime import ModelRuntime, runtime_of
from castspec.text import IncrementalText
from castspec.tree import DraftTree
from castspec.verify import SamplingConfig, TokenChooser, verify

CONTEXT_MARGIN = 256  # positions kept free past a sequence's budget: room for the largest tree a step may verify


@dataclass
class GenerationStats:
    """One sequence's record. Timings of the steps it took part in are the whole batch's (a step serves every row
    at once); `wall_s` is this sequence's own latency, from the call's start to its last token."""

    steps: int = 0  # target forwards after the prefill while this sequence was in the batch
    accepted: list[int] = field(default_factory=list)  # accepted draft tokens per step
    tree_sizes: list[int] = field(default_factory=list)
    verified: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)  # depth of the verified tree per step
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    wall_s: float = 0.0
    new_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the target took from its kept prefix instead of prefilling them
    plans: list[dict[str, Any]] = field(default_factory=list)

    @property
    def mean_accept_len(self) -> float:
        """Tokens produced per target verification step (accepted draft tokens + the bonus token)."""
        return (sum(self.accepted) + len(self.accepted)) / max(len(self.accepted), 1)

    @property
    def tokens_per_s(self) -> float:
        """This sequence's tokens over its own latency (for a batch's throughput see `BatchStats`)."""
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self, per_step: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "steps": self.steps,
            "new_tokens": self.new_tokens,
            "mean_accept_len": round(self.mean_accept_len, 4),
            "wall_s": round(self.wall_s, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "prefill_s": round(self.prefill_s, 4),
            "draft_s": round(self.draft_s, 4),
            "verify_s": round(self.verify_s, 4),
            "cached_tokens": self.cached_tokens,
        }
        if per_step:
            out.update(accepted_per_step=self.accepted, tree_sizes=self.tree_sizes, verified_per_step=self.verified,
                       depth_per_step=self.depths)
            if self.plans:
                out["plans"] = self.plans
        return out


@dataclass
class BatchStats:
    """One `generate_batch` call as a whole: every step counted once, until the last sequence finished."""

    rows: int = 0
    steps: int = 0
    new_tokens: int = 0  # all sequences' tokens
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    wall_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """Throughput: all sequences' tokens over the call's wall time."""
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "steps": self.steps, "new_tokens": self.new_tokens,
                "tokens_per_s": round(self.tokens_per_s, 3), "wall_s": round(self.wall_s, 4),
                "prefill_s": round(self.prefill_s, 4), "draft_s": round(self.draft_s, 4),
                "verify_s": round(self.verify_s, 4)}


@dataclass
class GenerationResult:
    token_ids: list[int]  # new tokens only
    text: str
    stats: GenerationStats
    prompt_tokens: int
    batch_stats: BatchStats  # the same object for every sequence of one call


@dataclass
class BatchState:
    """The live batch between steps: which sequences it holds (in cache order) and what each still needs.

    Sequences are known by the caller's keys (any ints). They join (`SpeculativeGenerator.add_rows`) and leave
    (they finish, or `remove_rows`) between steps; every step serves the rows present at that moment."""

    rows: list[int] = field(default_factory=list)  # the caller's key of each live sequence, in cache order
    root: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # [B] last tokens
    produced: dict[int, int] = field(default_factory=dict)  # tokens emitted so far, by key
    budget: dict[int, int] = field(default_factory=dict)  # max new tokens, by key
    choosers: dict[int, TokenChooser] = field(default_factory=dict)  # each sequence's own sampling, by key
    stats: dict[int, GenerationStats] = field(default_factory=dict)  # by key
    batch_stats: BatchStats = field(default_factory=BatchStats)
    drafter: Drafter | None = None  # None when the policy decodes plainly: the draft model is never touched
    start_time: float = 0.0
    joined: dict[int, float] = field(default_factory=dict)  # when each sequence joined (its latency's start)
    prompt_len: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # [B], rows' order

    def forget(self, keys: list[int]) -> None:
        """Drop the records of sequences that have left: a long-lived batch (a server's) would otherwise keep every
        past sequence's stats and sampling tables. Keys still live are kept."""
        for key in set(keys) - set(self.rows):
            for records in (self.produced, self.budget, self.choosers, self.stats, self.joined):
                records.pop(key, None)

    def all_greedy(self, rows: list[int] | None = None) -> bool:
        """Every row (or every one of `rows`) decodes greedily: its tokens are argmaxes, nothing else of the logits."""
        return all(self.choosers[key].config.greedy for key in (self.rows if rows is None else rows))

    def choose(self, logits: torch.Tensor, index: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        """Each row's target token at each of n positions from logits [B, n, V], by that row's own chooser;
        `index` [B, n] is the output index the chosen token would have (see `TokenChooser`)."""
        if self.all_greedy(rows):
            return logits.argmax(dim=-1)
        choosers = [self.choosers[key] for key in (self.rows if rows is None else rows)]
        return torch.stack([chooser(logits[i], index[i]) for i, chooser in enumerate(choosers)])


class SpeculativeGenerator:
    """Generate with a target model, optionally sped up by a draft model and a tree policy."""

    def __init__(self, target, tokenizer, draft: Any = None, policy: TreePolicy | str = "ar",
                 costs: OnlineCosts | None = None, suffix: bool = False, draft_window: int = 0,
                 suffix_cache: int = 0, lazy_draft: bool = False):
        """`target`: the target model, or its `ModelRuntime` (`castspec.runtime`; its runner is then the one this
        generator drives). `draft`: a draft model or its `ModelRuntime` (a causal LM with the target's vocabulary), a
        `Drafter` (e.g. `SuffixDrafter()`: speculation without a draft model), or None (plain decoding only).
        `suffix` with a draft model: merge its candidates with repeats of the prompt and output
        (`castspec.drafters.suffix.MixedDrafter`).
        `draft_window` > 0: the draft model reads only each prompt's last `draft_window` tokens (cheaper prefill).
        `suffix_cache` N > 0 (with `suffix`): repeats are also looked up in the outputs of the last N finished
        sequences (`castspec.drafters.suffix.SuffixCache`). `lazy_draft` with a draft model: speculate from repeats
        first and prefill the draft model only once it has earned its prefill (`castspec.drafters.lazy`)."""
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        target_runtime = runtime_of(target, "target")
        draft_runtime = runtime_of(draft, "draft") if isinstance(draft, (torch.nn.Module, ModelRuntime)) else None
        self.runtimes = {"target": target_runtime, **({"draft": draft_runtime} if draft_runtime else {})}
        target = target_runtime.model
        if self.policy.uses_draft and draft is None:
            raise CastspecError(f"policy '{self.policy.name}' needs a draft model (--draft)")
        for name, value in (("draft_window", draft_window), ("suffix_cache", suffix_cache)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CastspecError(f"{name} must be a whole number >= 0 (0: off), got {value!r}")
        if getattr(self.policy, "needs_costs", False):
            if costs is None:
                raise CastspecError(f"policy '{self.policy.name}' needs a cost table; use load_generator(), which "
                                    "loads or profiles one, or pass costs=")
            self.policy.attach_costs(costs)
        self.costs = costs
        self.target_prefill_ms_per_token: float | None = None  # the last prefill's, measured (a lazy draft's price)
        self.tokenizer = tokenizer
        self.target = target_runtime.runner
        self.drafter: Drafter | None = None  # proposes only; the target decides every token
        if isinstance(draft, Drafter):
            self.drafter = draft if self.policy.uses_draft else None
        elif draft_runtime is not None and self.policy.uses_draft:
            check_same_vocabulary(target, draft_runtime.model)
            lm = DraftLM(draft_runtime.runner, window=draft_window)
            repeats = SuffixDrafter(target.device, cache_size=suffix_cache)
            self.drafter = LazyDraft(lm, repeats, self._draft_prefill_ms) if lazy_draft else \
                MixedDrafter(lm, repeats) if suffix else lm
        self.vocab_size = target.get_input_embeddings().weight.shape[0]  # valid token ids: 0 .. vocab_size - 1
        check_children_fit(self.policy, self.drafter.vocab_size if self.drafter is not None else self.vocab_size)
        self.eos_ids = _eos_ids(target, tokenizer)

    def _draft_prefill_ms(self, rows: int, tokens: int) -> float:
        """The draft model's predicted prefill time over `rows` contexts of `tokens` tokens: the target's prefill
        as last measured (ms per token) times the draft/target cost ratio of the widest profiled block. The table's
        blocks compute logits at every token and a prefill at the last one only, so the draft's own per-token figure
        there (used before any prefill was measured) came out ~1.4x too dear (q4k pair, HumanEval). 0 without a cost
        table: then a lazy draft is bought at once."""
        if self.costs is None or "draft" not in self.costs.table.ms:
            return 0.0
        widest = max(self.costs.table.tokens)
        draft_ms = self.costs.time_ms("draft", 1, tokens, widest)
        if self.target_prefill_ms_per_token is None:
            return draft_ms / widest * rows * tokens
        ratio = draft_ms / self.costs.time_ms("target", 1, tokens, widest)
        return self.target_prefill_ms_per_token * ratio * rows * tokens

    # --- public API ----------------------------------------------------------------------------------------
    @property
    def models(self) -> dict[str, torch.nn.Module]:
        """The models this generator runs, by role: "target", and "draft" when it was given a draft model (for
        profiling, reports and kernel descriptions; callers need not know how the engine wraps them)."""
        return {role: runtime.model for role, runtime in self.runtimes.items()}

    @property
    def reuse_prefix(self) -> bool:
        """Whether a one-prompt prefill reuses the models' caches of the last sequence that ended (the start they
        share: the next turn of a conversation, a common system prompt); `castspec.models.runner`. On by default."""
        return self.target.reuse_prefix

    @reuse_prefix.setter
    def reuse_prefix(self, on: bool) -> None:
        for runtime in self.runtimes.values():
            runtime.runner.reuse_prefix = bool(on)

    def forget_prefix(self) -> None:
        """Drop what the models kept of the last sequence: the next prompt is prefilled whole (a warm-up's prompt,
        or another method's run of the same prompt, must not shorten a measured prefill)."""
        for runtime in self.runtimes.values():
            runtime.runner.forget_prefix()

    def generate(self, prompt: str | list[int] | torch.Tensor, max_new_tokens: int = 128, chat: bool = False,
                 on_tokens: Callable[[list[int]], None] | None = None, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] = ()) -> GenerationResult:
        """Generate. Greedy (temperature 0) gives exactly the target's own greedy tokens; sampling gives exactly
        the target's distribution (temperature, top-k, top-p as in `transformers`); `seed` makes it repeatable.
        `stop`: strings that end the output (the text is cut before the first; `token_ids` are the tokens accepted
        up to the step that produced it)."""
        callback = (lambda row, tokens: on_tokens(tokens)) if on_tokens is not None else None
        return self.generate_batch([prompt], max_new_tokens, chat, callback, temperature, top_k, top_p, seed,
                                   stop)[0]

    def generate_batch(self, prompts: list[str | list[int] | torch.Tensor], max_new_tokens: int = 128,
                       chat: bool = False, on_tokens: Callable[[int, list[int]], None] | None = None,
                       temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                       stop: Sequence[str] = ()) -> list[GenerationResult]:
        """Generate for several prompts at once (one tree per sequence, one target forward per step for all).

        Each output is distributed exactly as that prompt's own decoding (identical, when greedy). Sequences that
        finish (EOS, budget or a `stop` string) leave the batch. `on_tokens(row, tokens)` is called as tokens are
        accepted.
        """
        config = SamplingConfig(temperature, top_k, top_p, seed)
        if not prompts:
            raise CastspecError("no prompts given")
        ids = [self.encode(p, chat) for p in prompts]
        for row in ids:
            self._check_lengths(len(row), max_new_tokens)
        outs: list[list[int]] = [[] for _ in ids]
        texts = [IncrementalText(self.tokenizer, stop, self.eos_ids) for _ in ids]
        state = self.open_batch()
        for row, tokens in self._decode(state, ids, max_new_tokens, config):
            outs[row].extend(tokens)
            if on_tokens is not None:
                on_tokens(row, tokens)
            if stop and texts[row].feed(tokens)[1]:
                self.remove_rows(state, [row])  # a stop string: this sequence is done
        results = []
        for row, out in enumerate(outs):
            state.stats[row].new_tokens = len(out)
            text = texts[row].sent if texts[row].stopped else self.tokenizer.decode(out, skip_special_tokens=True)
            results.append(GenerationResult(token_ids=out, text=text, stats=state.stats[row],
                                            prompt_tokens=len(ids[row]), batch_stats=state.batch_stats))
        return results

    def stream(self, prompt: str | list[int] | torch.Tensor, max_new_tokens: int = 128, chat: bool = False,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
               ) -> Iterator[str]:
        """Yield text pieces as tokens are accepted."""
        ids = self.encode(prompt, chat)
        self._check_lengths(len(ids), max_new_tokens)
        config = SamplingConfig(temperature, top_k, top_p, seed)
        out: list[int] = []
        shown = ""
        state = self.open_batch()
        for _, tokens in self._decode(state, [ids], max_new_tokens, config):
            out.extend(tokens)
            text = self.tokenizer.decode(out, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                continue
            yield text[len(shown):]
            shown = text

    def chooser(self, config: SamplingConfig, stream: int = 0) -> TokenChooser:
        """A sequence's token chooser on the target's device; `stream` separates rows that share one seed."""
        return TokenChooser(config, self.target.device, stream)

    def encode(self, prompt: str | list[int] | torch.Tensor, chat: bool = False) -> list[int]:
        """Token ids of a prompt given as text (optionally in the chat template), a list of ids or a tensor."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise CastspecError("the prompt is empty")
            if chat:
                if not getattr(self.tokenizer, "chat_template", None):
                    raise CastspecError("--chat: this model's tokenizer has no chat template")
                return self.encode_conversation([{"role": "user", "content": prompt}])
            ids = self.tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, torch.Tensor):
            ids = prompt.reshape(-1).tolist()
        else:
            ids = list(prompt)
        if not ids:
            raise CastspecError("the prompt is empty")
        try:
            ids = [operator.index(i) for i in ids]
        except TypeError:
            raise CastspecError("prompt token ids must be whole numbers") from None
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:  # the embedding lookup would fail (or, on some devices, read garbage)
            raise CastspecError(f"prompt token id {bad} is outside the vocabulary (0 .. {self.vocab_size - 1})")
        return ids

    def encode_conversation(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation (`[{"role", "content"}, ...]`) in the tokenizer's chat template, ready for
        the assistant's next turn. Each turn's ids start with the turn before's, so a turn after an answer prefills
        only what it adds (`castspec.models.runner`)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise CastspecError("this model's tokenizer has no chat template")
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as err:  # templates refuse what they cannot render (e.g. a system role) with an exception
            raise CastspecError(f"the chat template refused these messages: {err}") from None
        return self.encode(list(ids if isinstance(ids, list) else ids["input_ids"]))

    # --- the loop: a live batch that sequences join and leave between steps ---------------------------------
    def open_batch(self) -> BatchState:
        """An empty live batch. The caches live in this generator, so it serves one live batch at a time."""
        drafter = None
        if self.policy.uses_draft:
            if self.drafter is None:
                raise CastspecError(f"policy '{self.policy.name}' needs a draft model, and this generator has none")
            drafter = self.drafter
        return BatchState(drafter=drafter, start_time=time.perf_counter())

    @torch.inference_mode()  # every tensor of a live batch is made and changed here (no autograd bookkeeping)
    def add_rows(self, state: BatchState, keys: list[int], prompts: list[list[int]], max_new_tokens: list[int],
                 choosers: list[TokenChooser]) -> list[tuple[int, list[int], bool]]:
        """Prefill new sequences (target, and draft if the batch speculates) and merge them into the live batch.

        Returns (key, first token, finished) for each; finished ones have already left. The rows already in the
        batch keep their caches: a joining row never changes another row's tokens (canonical attention)."""
        if len(set(keys)) != len(keys) or set(keys) & set(state.rows):
            raise CastspecError("a sequence key must be unique in the live batch")
        t0 = time.perf_counter()
        fresh = not state.rows
        if fresh:
            self.policy.new_batch()
        now = t0 - state.start_time
        for key, budget, chooser in zip(keys, max_new_tokens, choosers, strict=True):
            state.produced[key], state.budget[key], state.choosers[key] = 0, budget, chooser
            state.stats[key], state.joined[key] = GenerationStats(), now
        try:
            first = self._prefill_rows(state, keys, prompts, max_new_tokens, fresh)
        except BaseException:  # the live rows go on as they were; the new ones never joined
            state.forget(keys)
            raise
        prompt_len = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=first.device)
        state.rows = state.rows + list(keys)
        state.root = first if fresh else torch.cat([state.root, first])
        state.prompt_len = prompt_len if fresh else torch.cat([state.prompt_len, prompt_len])
        elapsed = time.perf_counter() - t0
        state.batch_stats.rows += len(keys)
        state.batch_stats.prefill_s += elapsed
        cached = len(prompts[0]) - self.target.prefilled_tokens if len(keys) == 1 else 0  # one prompt may reuse
        for key in keys:
            state.stats[key].prefill_s, state.stats[key].cached_tokens = elapsed, cached
        tokens = [[t] for t in first.tolist()]
        return self._finish(state, keys, tokens)

    def _prefill_rows(self, state: BatchState, keys: list[int], prompts: list[list[int]],
                      max_new_tokens: list[int], fresh: bool) -> torch.Tensor:
        """Prefill new rows into the target (and the draft); their first tokens [n]. On failure the caches hold the
        live rows only, as before the call."""
        for key, budget in zip(keys, max_new_tokens, strict=True):
            state.choosers[key].reserve(budget + 1)
        live = len(state.rows)
        t0 = time.perf_counter()
        logits = self.target.add_rows(prompts, max(max_new_tokens), fresh=fresh)  # [n, V]: each last position
        ran = max(self.target.prefilled_tokens, 1)  # tokens a kept prefix did not hold (runner.prefill)
        self.target_prefill_ms_per_token = 1000 * (time.perf_counter() - t0) / ran
        try:
            first = state.choose(logits[:, None], torch.zeros(len(keys), 1, dtype=torch.long, device=logits.device),
                                 keys)[:, 0]
            if state.drafter is not None:
                state.drafter.add_rows(prompts, first, max(max_new_tokens), fresh=fresh)
        except BaseException:
            if live:
                self.target.keep_rows(list(range(live)))
            raise
        return first

    def room(self, prompt_len: int) -> int | None:
        """How many new tokens fit after a prompt of this length (None: the models state no context limit)."""
        runners = filter(None, [self.target, getattr(self.drafter, "runner", None)])
        limits = [runner.max_positions for runner in runners if runner.max_positions]
        return min(limits) - prompt_len - CONTEXT_MARGIN if limits else None

    @torch.inference_mode()  # every tensor of a live batch is made and changed here (no autograd bookkeeping)
    def step(self, state: BatchState) -> list[tuple[int, list[int], bool]]:
        """One speculative step for every live row: (key, new tokens, finished). Finished rows have left."""
        if not state.rows:
            return []
        return self._finish(state, list(state.rows), self._step(state))

    @torch.inference_mode()  # every tensor of a live batch is made and changed here (no autograd bookkeeping)
    def remove_rows(self, state: BatchState, keys: list[int]) -> None:
        """These sequences leave the batch now (cancelled): they cost no more work."""
        gone = set(keys) & set(state.rows)
        now = time.perf_counter() - state.start_time
        for key in gone:
            state.stats[key].wall_s = now - state.joined[key]
        self._retire(state, gone)

    def _decode(self, state: BatchState, prompts: list[list[int]], max_new_tokens: int, config: SamplingConfig,
                ) -> Iterator[tuple[int, list[int]]]:
        """Yield (caller row, accepted tokens) as steps complete, until every sequence has finished. Row i samples
        from stream i of the seed: rows are independent, and row 0 draws as the same prompt would alone."""
        state.start_time = time.perf_counter()
        keys = list(range(len(prompts)))
        choosers = [self.chooser(config, stream=key) for key in keys]
        events = self.add_rows(state, keys, prompts, [max_new_tokens] * len(keys), choosers)
        while True:
            yield from ((key, tokens) for key, tokens, _ in events if tokens)
            if not state.rows:
                break
            events = self.step(state)
        state.batch_stats.wall_s = time.perf_counter() - state.start_time

    def _finish(self, state: BatchState, keys: list[int], tokens: list[list[int]],
                ) -> list[tuple[int, list[int], bool]]:
        """Cut tokens at budgets and EOS, let finished rows leave, and report (key, tokens, finished)."""
        finished = self._emit(state, keys, tokens)
        self._retire(state, finished)
        return [(key, toks, key in finished) for key, toks in zip(keys, tokens, strict=True)]

    def _step(self, state: BatchState) -> list[list[int]]:
        """One speculative step for the live batch: draft, verify in one target forward, commit the accepted path.

        Returns each live row's accepted tokens (drafted ones that the target agreed with, then its own token)."""
        if state.drafter is not None:  # e.g. a lazy draft model's prefill: prefill time, not the step's
            t_pre = time.perf_counter()
            state.drafter.between_steps()
            self._count_prefill(state, time.perf_counter() - t_pre)
        ctx = StepContext(batch_size=len(state.rows), context_len=self.target.cache.max_length,
                          remaining=max(state.budget[row] - state.produced[row] for row in state.rows),
                          draft_free=state.drafter is not None and state.drafter.free)
        self.policy.begin_step(ctx)
        t0 = time.perf_counter()
        tree = self._draft(state.root, ctx)
        t1 = time.perf_counter()
        nodes = self.policy.select(tree) if tree.size else tree.tokens
        vtree = tree.select(nodes)
        outcome = self._verify(vtree, state)
        if state.drafter is not None:
            state.drafter.finish_step(tree, vtree.nodes, outcome)
        t2 = time.perf_counter()
        state.root = outcome.bonus
        n_accepted = outcome.n_accepted.tolist()
        verified_depth = int(vtree.depth.max()) if vtree.size else 0
        plan = self.policy.plan()
        self.policy.observe(StepRecord(tree_size=tree.size, verified=vtree.size, depth=verified_depth,
                                       accepted=outcome.n_accepted, draft_s=t1 - t0, verify_s=t2 - t1, plan=plan,
                                       **_edge_outcomes(tree, vtree, outcome)))
        batch = state.batch_stats
        batch.steps, batch.draft_s, batch.verify_s = batch.steps + 1, batch.draft_s + t1 - t0, batch.verify_s + t2 - t1
        for i, row in enumerate(state.rows):
            st = state.stats[row]
            st.steps += 1
            st.accepted.append(n_accepted[i])
            st.tree_sizes.append(tree.size)
            st.verified.append(vtree.size)
            st.depths.append(verified_depth)
            st.draft_s += t1 - t0
            st.verify_s += t2 - t1
            if plan:
                st.plans.append({**plan, "accepted": n_accepted[i], "draft_ms": round(1000 * (t1 - t0), 2),
                                 "verify_ms": round(1000 * (t2 - t1), 2)})
        new_tokens = outcome.new_tokens.tolist()
        return [new_tokens[i][: n_accepted[i] + 1] for i in range(len(state.rows))]

    @staticmethod
    def _count_prefill(state: BatchState, seconds: float) -> None:
        state.batch_stats.prefill_s += seconds
        for row in state.rows:
            state.stats[row].prefill_s += seconds

    def _verify(self, vtree, state: BatchState):
        """The target's one forward over root + verified nodes; its cache keeps exactly the accepted path."""
        tokens, positions, block_mask = vtree.block_inputs(self.target.next_pos)
        self.target.begin_block()
        if state.all_greedy():  # argmaxes only: the target's greedy head need not read its whole output head
            chosen = self.target.forward_greedy(tokens, positions, block_mask)
        else:  # the token chosen at a node at position p is output token p + 1 - prompt length of its row
            chosen = state.choose(self.target.forward(tokens, positions, block_mask),
                                  positions + 1 - state.prompt_len[:, None])
        outcome = verify(vtree, chosen)
        root_slot = torch.zeros_like(outcome.bonus)[:, None]
        self.target.commit(torch.cat([root_slot, outcome.path + 1], dim=1), outcome.n_accepted + 1)
        return outcome

    def _emit(self, state: BatchState, keys: list[int], accepted: list[list[int]]) -> set[int]:
        """Cut each row's accepted tokens at its budget and at EOS (in place); return the rows that finished."""
        finished = set()
        for row, tokens in zip(keys, accepted, strict=True):
            del tokens[state.budget[row] - state.produced[row]:]
            for i, token in enumerate(tokens):
                if token in self.eos_ids:
                    del tokens[i + 1:]
                    finished.add(row)
                    break
            state.produced[row] += len(tokens)
            state.batch_stats.new_tokens += len(tokens)
            if state.produced[row] >= state.budget[row]:
                finished.add(row)
        now = time.perf_counter() - state.start_time
        for row in finished:
            state.stats[row].wall_s = now - state.joined[row]
        return finished

    def _retire(self, state: BatchState, finished: set[int]) -> None:
        """Finished sequences leave the batch: they cost no more work."""
        if not finished:
            return
        keep = [i for i, row in enumerate(state.rows) if row not in finished]
        state.rows = [state.rows[i] for i in keep]
        if not keep:  # the next row to join starts fresh caches
            state.root, state.prompt_len = state.root[:0], state.prompt_len[:0]
            return
        self.target.keep_rows(keep)
        if state.drafter is not None:
            state.drafter.keep_rows(keep)
        index = torch.tensor(keep, dtype=torch.long, device=state.root.device)
        state.root, state.prompt_len = state.root[index], state.prompt_len[index]

    def _draft(self, root: torch.Tensor, ctx: StepContext) -> DraftTree:
        """Grow the tree level by level; the drafter proposes each expanded level's children (an LM drafter: one
        forward per level)."""
        tree = DraftTree.empty(root)
        max_depth = min(self.policy.max_depth(), ctx.remaining - 1)
        if self.drafter is None or max_depth <= 0:
            return tree
        k = self.policy.children_per_node(1)
        children = self.drafter.start(k)  # [B, 1, k]
        frontier = None  # None: the root
        frontier_score = torch.zeros(root.shape[0], 1, device=root.device)
        for level in range(1, max_depth + 1):
            cand_score = (frontier_score[:, :, None] + children.scores).flatten(1)
            cand_source = children.source.flatten(1)
            keep, n_expand = self.policy.choose(level, cand_score, cand_source)
            if keep.shape[1] == 0:
                break
            from_frontier = keep // k
            parents = frontier.gather(1, from_frontier) if frontier is not None else torch.full_like(keep, -1)
            new_nodes = tree.add_level(children.tokens.flatten(1).gather(1, keep), parents,
                                       cand_score.gather(1, keep), cand_source.gather(1, keep))
            if n_expand == 0 or level == max_depth:
                break
            frontier = new_nodes[:, :n_expand]
            frontier_score = tree.logscore.gather(1, frontier)
            k = self.policy.children_per_node(level + 1)
            children = self.drafter.expand(tree, frontier, k)
        return tree

    def _check_lengths(self, prompt_len: int, max_new_tokens: int) -> None:
        if max_new_tokens < 1:
            raise CastspecError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        room = self.room(prompt_len)
        if room is not None and max_new_tokens > room:
            limit = room + prompt_len + CONTEXT_MARGIN
            raise CastspecError(
                f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds the model's context of "
                f"{limit} positions (keep {CONTEXT_MARGIN} for the draft tree); shorten the prompt or "
                "--max-new-tokens")


def _edge_outcomes(tree: DraftTree, vtree, outcome) -> dict[str, torch.Tensor]:
    """Per verified node: its log-score given its parent, who proposed it, whether its parent was accepted, and
    whether it was.

    Nodes whose parent was accepted are exactly the ones the target judged; they calibrate each source's confidence.
    """
    batch, count = vtree.tokens.shape
    accepted = torch.zeros(batch, count + 1, dtype=torch.bool, device=vtree.tokens.device)
    accepted.scatter_(1, torch.where(outcome.path >= 0, outcome.path, count), True)
    accepted = accepted[:, :count]
    score = tree.logscore.gather(1, vtree.nodes)
    parent = vtree.parent_pos.clamp(min=0)
    is_child_of_root = vtree.parent_pos < 0
    parent_score = torch.where(is_child_of_root, 0.0, score.gather(1, parent))
    parent_accepted = is_child_of_root | accepted.gather(1, parent)
    return {"edge_logp": score - parent_score, "parent_accepted": parent_accepted, "node_accepted": accepted,
            "edge_source": tree.source.gather(1, vtree.nodes)}


def check_same_vocabulary(target, draft) -> None:
    """The draft must speak the target's token ids, or its proposals are meaningless."""
    t_vocab, d_vocab = target.config.vocab_size, draft.config.vocab_size
    t_emb = target.get_input_embeddings().weight.shape[0]
    d_emb = draft.get_input_embeddings().weight.shape[0]
    if t_vocab != d_vocab or t_emb != d_emb:
        raise CastspecError(f"the draft's vocabulary ({d_vocab} tokens) differs from the target's ({t_vocab}); "
                            "use a draft with the same tokenizer")


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
