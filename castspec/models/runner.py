"""Drive a stock Hugging Face causal LM over a batch of rows with an in-place KV cache, tree masks and positions.

Both the target and a draft LM go through this adapter; no modeling file is patched. The cache
(`castspec.models.kv_cache.TreeKVCache`) holds exactly each row's committed tokens, so a row's next position is its
length. A decoding step appends a *block* of speculative tokens (one or several forwards); every forward gets an
explicit 4D additive mask — each query sees its row's committed tokens plus the block slots the caller's block mask
allows — and `position_ids = length + depth`, so tree nodes at the same depth share a position, the rotary phase a
token would have had in plain decoding. `commit` keeps a per-row subset of the block (the accepted path).

When a row leaves, its committed tokens are kept (`Prefix`: ids, keys and values; the last `KEPT_PREFIXES` rows to
leave), and a one-prompt prefill that starts with some of them runs only the rest: the next turn of a conversation
(also one of several interleaved conversations), or a prompt behind the same system prompt, as llama.cpp's and
vLLM's prefix caches do. Exact: a token's keys and values depend
only on the tokens before it (canonical attention, row-independent kernels), so the reused ones are the bits a full
prefill would write, and the prompt's last logits are the same (tested).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from castspec.models.attention import CHUNK, key_layout, use_tree_attention
from castspec.models.kv_cache import Prefix, TreeKVCache

# Slots reserved beyond prompt + budget for one step's speculative block; a step that needs more grows the cache.
BLOCK_RESERVE = 64
# Sequences whose committed tokens are kept for later prompts, most recent first: a few interleaved conversations
# (a server's clients) each find their own. Each holds its keys and values (~57 KB per token for a 1.5B fp32 cache).
KEPT_PREFIXES = 4


class CausalLMRunner:
    """KV-cached forwards of one causal LM over a batch of rows."""

    def __init__(self, model: PreTrainedModel, canonical: bool = True):
        """`canonical`: attend in canonical order (`castspec.models.attention`), so a token's logits never depend on
        what shares the forward. Targets need it; a draft may skip it (its output only proposes), unless it runs
        native decoder layers, which read the canonical key layout (`castspec.models.native_layer`)."""
        from castspec.models.greedy_head import greedy_head_of
        from castspec.models.native_layer import NativeDecoderLayer, NativeStack

        self.model = model
        self.canonical = canonical or any(isinstance(m, NativeDecoderLayer) for m in model.modules())
        self.native = NativeStack.of(model)  # the whole forward natively (bitwise the stock path's result)
        self.greedy_head = greedy_head_of(model)  # greedy tokens without the whole output head (q4k targets)
        use_tree_attention(model)  # no KV copy; a query's result never depends on the other queries
        self.config = model.config
        self.device = model.device
        self.dtype = model.dtype
        layer_types = getattr(self.config, "layer_types", None) or []
        has_sliding = "sliding_attention" in layer_types
        self.sliding_window = getattr(self.config, "sliding_window", None) if has_sliding else None
        self.max_positions = getattr(self.config, "max_position_embeddings", None)
        self.reuse_prefix = True  # keep the last row that left, and prefill only what a new prompt adds to it
        self.kept: list[Prefix] = []  # most recent first
        self.prefilled_tokens = 0  # prompt tokens the last prefill ran through the model (reused ones not counted)
        self.reset(batch_size=1, capacity=BLOCK_RESERVE)

    # --- state -----------------------------------------------------------------------------------------------
    def reset(self, batch_size: int, capacity: int) -> None:
        """An empty cache for `batch_size` rows with room for `capacity` tokens per row."""
        self.cache = TreeKVCache(self.config.num_hidden_layers, batch_size, capacity, self.device, self.dtype,
                                 align=CHUNK if self.canonical else 1)
        self.block_pos = torch.zeros(batch_size, 0, dtype=torch.long, device=self.device)  # positions of the block

    @property
    def next_pos(self) -> torch.Tensor:
        """[B] position of each row's next token = its committed length."""
        return self.cache.length

    @property
    def batch_size(self) -> int:
        return self.cache.batch_size

    @property
    def block_len(self) -> int:
        return self.cache.block

    def begin_block(self) -> None:
        """Start a step's speculative block, forgetting any uncommitted one."""
        self.cache.discard_block()
        self.block_pos = self.block_pos[:, :0]

    # --- forwards --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], budget: int = 0) -> torch.Tensor:
        """Run the prompts (one row each, any lengths) into a fresh cache with room for `budget` more tokens per
        row (plus a step's block); returns each row's last logits [B, V].

        Rows are right-padded in one forward: padding lands in slots past the row's length, which stay invalid.
        One prompt that starts with tokens of the kept prefix runs only the tokens after them.
        """
        self._keep_longest(range(self.batch_size), copy=False)  # the old cache is dropped, nothing writes it now
        return self._prefill_rows(prompts, budget)

    def _prefill_rows(self, prompts: list[list[int]], budget: int) -> torch.Tensor:
        """`prefill` into a fresh cache, the current one's rows not kept."""
        prefix, shared = self._best_prefix(prompts[0]) if len(prompts) == 1 else (None, 0)
        if prefix is not None:
            return self._prefill_after(prompts[0], prefix, shared, budget)
        self.prefilled_tokens = sum(len(p) for p in prompts)
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=self.device)
        longest = max(len(p) for p in prompts)
        self.reset(len(prompts), longest + budget + BLOCK_RESERVE)
        tokens = torch.tensor([p + [0] * (longest - len(p)) for p in prompts], dtype=torch.long, device=self.device)
        valid = torch.arange(longest, device=self.device)[None, :] < lengths[:, None]
        causal = torch.ones(longest, longest, dtype=torch.bool, device=self.device).tril()
        positions = torch.arange(longest, device=self.device).expand(len(prompts), -1)
        logits = self.forward(tokens, positions, causal[None] & valid[:, None, :], token_valid=valid,
                              logits_to_keep=(lengths - 1)[:, None])  # only each row's last position
        self.cache.set_lengths(lengths)
        self.begin_block()
        return logits[:, -1]

    @torch.inference_mode()
    def forget_prefix(self) -> None:
        """Keep nothing of the sequences so far: neither the kept prefix nor the rows the cache still holds (a
        batch that emptied leaves its last rows there until the next prefill, which would keep them)."""
        self.kept = []
        self.cache.ids.fill_(-1)

    def reusable(self, prompt: list[int]) -> int:
        """How many leading tokens of `prompt` a prefill would take from a kept prefix instead of running them
        (never the last one: its logits are the prefill's result)."""
        return self._best_prefix(prompt)[1]

    def _best_prefix(self, prompt: list[int]) -> tuple[Prefix | None, int]:
        """The kept prefix that shares the most leading tokens with `prompt`, and how many of them to reuse."""
        best, shared = None, 0
        if self.reuse_prefix and len(prompt) >= 2:
            for prefix in self.kept:
                length = min(prefix.shared_length(prompt), len(prompt) - 1)
                if length > shared:
                    best, shared = prefix, length
        return best, shared

    def _prefill_after(self, prompt: list[int], prefix: Prefix, shared: int, budget: int) -> torch.Tensor:
        """`prefill` of one prompt whose first `shared` tokens `prefix` holds: seed, then run the rest."""
        rest = len(prompt) - shared
        self.reset(1, len(prompt) + budget + BLOCK_RESERVE)
        self.cache.seed(prefix, shared)
        tokens = torch.tensor([prompt[shared:]], dtype=torch.long, device=self.device)
        positions = torch.arange(shared, len(prompt), device=self.device)[None]
        causal = torch.ones(rest, rest, dtype=torch.bool, device=self.device).tril()[None]
        last = torch.full((1, 1), rest - 1, dtype=torch.long, device=self.device)
        logits = self.forward(tokens, positions, causal, logits_to_keep=last)
        self.cache.set_lengths(torch.tensor([len(prompt)], dtype=torch.long))
        self.begin_block()
        self.prefilled_tokens = rest
        return logits[:, -1]

    @torch.inference_mode()
    def add_rows(self, prompts: list[list[int]], budget: int = 0, fresh: bool = False) -> torch.Tensor:
        """Prefill new rows and append them after the live ones (between steps); returns their last logits [n, V].

        `fresh`: there are no live rows, start a new cache. The new rows are prefilled in a cache of their own and
        then merged, so the live rows' entries are untouched."""
        if fresh:
            return self.prefill(prompts, budget)
        if self.cache.block:
            raise RuntimeError("rows can only join between steps (a speculative block is open)")
        live, live_pos = self.cache, self.block_pos
        try:
            logits = self._prefill_rows(prompts, budget)
        except BaseException:  # the live rows' cache stays as it was
            self.cache, self.block_pos = live, live_pos
            raise
        live.append_rows(self.cache)
        self.cache = live  # no block is open (checked above): only the block positions need the merged batch size
        self.block_pos = torch.zeros(self.batch_size, 0, dtype=torch.long, device=self.device)
        return logits

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        block_mask: torch.Tensor,
        token_valid: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """Append `tokens` [B, n] to the block and return their logits [B, n (or as kept), V].

        `block_mask` [B, n, S + n] says which of the block's earlier slots (S = `block_len`) and which of the new
        tokens each new token attends to; every query also sees its row's committed tokens. `token_valid` [B, n]
        marks padding among the new tokens (a padding query attends to itself only, so softmax stays finite).
        """
        return self._forward(tokens, positions, block_mask, token_valid, logits_to_keep)

    @torch.inference_mode()
    def forward_greedy(self, tokens: torch.Tensor, positions: torch.Tensor, block_mask: torch.Tensor,
                       token_valid: torch.Tensor | None = None) -> torch.Tensor:
        """As `forward`, but each new token's greedy choice [B, n] instead of its logits: `forward(...).argmax(-1)`,
        through the model's greedy head when it has one (`castspec.models.greedy_head`: the same ids, reading a
        fraction of the output head)."""
        if self.greedy_head is None:
            return self.forward(tokens, positions, block_mask, token_valid).argmax(dim=-1)
        return self._forward(tokens, positions, block_mask, token_valid, greedy=True)

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, block_mask: torch.Tensor,
                 token_valid: torch.Tensor | None, logits_to_keep: int | torch.Tensor = 0,
                 greedy: bool = False) -> torch.Tensor:
        """`forward`, or with `greedy` `forward_greedy` (the greedy head on the native path, else the argmax)."""
        batch, n = tokens.shape
        if token_valid is not None:
            own = torch.eye(n, dtype=torch.bool, device=self.device)[None] & ~token_valid[:, :, None]
            block_mask = torch.cat([block_mask[:, :, :-n], block_mask[:, :, -n:] | own], dim=2)
        self.block_pos = torch.cat([self.block_pos, positions], dim=1)
        end = self.cache.begin_write(n, tokens)
        allowed, key_pos = self._visible(block_mask, end)
        layout = key_layout(allowed, key_pos, positions, token_valid) if self.canonical else None
        try:
            if self.native is not None:
                head = self.greedy_head.argmax if greedy else None
                out = self.native.forward(tokens, positions, self.cache, layout, logits_to_keep, head)
                if out is not None:
                    return out
            logits = self._stock_forward(tokens, positions, allowed, key_pos, layout, logits_to_keep)
            return logits.argmax(dim=-1) if greedy else logits
        finally:
            self.cache.end_write(n)

    def _stock_forward(self, tokens: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor,
                       key_pos: torch.Tensor, layout, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
        """The model's own forward, with the additive masks its attention layers take."""
        mask = self._additive(allowed)
        if self.sliding_window is not None:
            near = (positions[:, :, None] - key_pos[:, None, :]) < self.sliding_window
            mask = {"full_attention": mask, "sliding_attention": self._additive(allowed & near)}
        extra = {"castspec_layout": layout} if layout is not None else {}
        out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=self.cache,
                         use_cache=True, logits_to_keep=logits_to_keep, **extra)
        return out.logits

    def _visible(self, block_mask: torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Which of the `end` attended slots each new token sees [B, n, end], and each slot's position [B, end]."""
        width = block_mask.shape[2]  # block slots so far, this forward's included
        slot = torch.arange(end, device=self.device)[None, :]
        rel = slot - self.cache.length[:, None]  # slot relative to the row's block start
        in_block = (rel >= 0) & (rel < width)
        index = rel.clamp(0, width - 1)
        sees_block = block_mask.gather(2, index[:, None, :].expand(-1, block_mask.shape[1], -1))
        allowed = (rel < 0)[:, None, :] | (in_block[:, None, :] & sees_block)
        key_pos = torch.where(in_block, self.block_pos.gather(1, index), slot)  # unused slots: as if in place
        return allowed, key_pos

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        return mask[:, None]

    # --- commit ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def commit(self, keep: torch.Tensor, keep_count: torch.Tensor) -> None:
        """Keep, per row, the block slots `keep[b, :keep_count[b]]` (ascending); the rest of the block is dropped.
        The row's length (its next position) advances by `keep_count`."""
        self.cache.commit(keep, keep_count)
        self.begin_block()

    @torch.inference_mode()
    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows of the batch (ascending indices); finished rows cost nothing more. The longest row
        that leaves is kept (between steps)."""
        self._keep_longest(sorted(set(range(self.batch_size)) - set(rows)), copy=True)
        self.cache.keep_rows(rows)
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.block_pos = self.block_pos.index_select(0, index)

    def _keep_longest(self, rows, copy: bool) -> None:
        """The longest of these rows joins the kept prefixes (first; a kept one it extends leaves): a copy, or
        (`copy=False`, the buffer of a one-row cache being dropped) a view, which keeps no other row's memory alive."""
        rows = list(rows)
        if not self.reuse_prefix or not rows:
            return
        longest = max(rows, key=lambda row: int(self.cache.length[row]))
        prefix = self.cache.prefix_of(longest, copy or self.batch_size > 1)
        if prefix is not None:
            others = [p for p in self.kept if not prefix.extends(p)]
            self.kept = [prefix, *others][:KEPT_PREFIXES]

    @torch.inference_mode()
    def synthetic_context(self, batch_size: int, length: int, seed: int = 0) -> None:
        """A `length`-token cache for `batch_size` rows without paying for a long prefill (for profiling).

        A forward's cost depends on the cache's size, not its contents: prefill a short random prompt and tile its
        keys and values up to `length` slots.
        """
        seed_len = min(length, 32)
        generator = torch.Generator().manual_seed(seed)
        prompt = torch.randint(3, self.config.vocab_size, (batch_size, seed_len), generator=generator)
        self.prefill(prompt.tolist(), budget=length - seed_len)
        self.forget_prefix()  # random tokens, tiled: nothing a prompt could reuse
        kv = self.cache.kv
        repeats = -(-length // seed_len)
        kv[..., :length, :] = kv[..., :seed_len, :].repeat(1, 1, 1, 1, repeats, 1)[..., :length, :]
        self.cache.set_lengths(torch.full((batch_size,), length, dtype=torch.long))
