"""Drive a stock Hugging Face causal LM with a KV cache, tree masks and explicit positions.

Both the target and a draft LM go through this adapter; no modeling file is patched. The cache is a plain
`DynamicCache` whose length is shared by the whole batch. Which cache slots a row may attend to is kept here in
`slot_valid` ([B, L]); left padding and the unaccepted tail of a step are simply invalid slots. Every forward gets
an explicit 4D additive mask (prefix validity + the caller's tree mask) and `position_ids = next position + depth`,
so tree nodes at the same depth share a position — the rotary phase a token would have had in plain decoding.

A decoding step appends a *block* of tokens (one or several forwards), then `commit` keeps a per-row subset of
that block (the accepted path), packs it to the front of the block and drops the rest.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from castspec.models.attention import use_grouped_attention


class CausalLMRunner:
    """KV-cached forwards of one causal LM over a batch of sequences."""

    def __init__(self, model: PreTrainedModel):
        self.model = model
        use_grouped_attention(model)  # tree forwards attend to the cached K/V of grouped heads without copying it
        self.config = model.config
        self.device = model.device
        self.dtype = model.dtype
        layer_types = getattr(self.config, "layer_types", None) or []
        has_sliding = "sliding_attention" in layer_types
        self.sliding_window = getattr(self.config, "sliding_window", None) if has_sliding else None
        self.max_positions = getattr(self.config, "max_position_embeddings", None)
        self.reset(batch_size=1)

    # --- state -----------------------------------------------------------------------------------------------
    def reset(self, batch_size: int) -> None:
        self.cache = DynamicCache()
        self.slot_valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=self.device)
        self.slot_pos = torch.zeros(batch_size, 0, dtype=torch.long, device=self.device)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.block_start = 0

    @property
    def cache_len(self) -> int:
        return self.slot_valid.shape[1]

    def begin_block(self) -> None:
        """Mark where this step's speculative entries start; `commit` only touches slots after it."""
        self.block_start = self.cache_len

    # --- forwards --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run left-padded prompts; returns the logits at each row's last token, [B, V]."""
        batch, length = input_ids.shape
        self.reset(batch)
        valid = attention_mask.to(torch.bool)
        positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
        causal = torch.ones(length, length, dtype=torch.bool, device=self.device).tril()
        block_mask = causal[None] & valid[:, None, :]
        logits = self.forward(input_ids, positions, block_mask, token_valid=valid, logits_to_keep=1)
        self.next_pos = valid.sum(dim=1)
        self.begin_block()
        return logits[:, -1]

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        block_mask: torch.Tensor,
        token_valid: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Append `tokens` [B, n] to the cache and return their logits [B, n or keep, V].

        `block_mask` [B, n, S + n] says which of this block's already-cached slots (S = slots since `begin_block`)
        and which of the new tokens each new token attends to; the prefix before the block is governed by
        `slot_valid`. `token_valid` [B, n] marks padding among the new tokens (they become invalid slots).
        """
        batch, n = tokens.shape
        if token_valid is None:
            token_valid = torch.ones(batch, n, dtype=torch.bool, device=self.device)
        # A padding query must still attend to something (itself), or softmax over nothing gives NaN.
        own = torch.eye(n, dtype=torch.bool, device=self.device)[None] & ~token_valid[:, :, None]
        block_mask = torch.cat([block_mask[:, :, :-n], block_mask[:, :, -n:] | own], dim=2)
        prefix_allowed = self.slot_valid[:, : self.block_start]
        allowed = torch.cat([prefix_allowed[:, None, :].expand(batch, n, -1), block_mask], dim=2)
        self.slot_valid = torch.cat([self.slot_valid, token_valid], dim=1)
        self.slot_pos = torch.cat([self.slot_pos, positions], dim=1)
        mask = self._additive(allowed)
        if self.sliding_window is not None:
            near = (positions[:, :, None] - self.slot_pos[:, None, :]) < self.sliding_window
            mask = {"full_attention": mask, "sliding_attention": self._additive(allowed & near)}
        out = self.model(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        return out.logits

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        return mask[:, None]

    # --- commit ----------------------------------------------------------------------------------------------
    def commit(self, keep: torch.Tensor, keep_count: torch.Tensor) -> None:
        """Keep, per row, the block slots `keep[b, :keep_count[b]]` (indices relative to the block start).

        The kept entries are packed to the front of the block in the given order; the block is cropped to the
        longest row and shorter rows get invalid slots. `next_pos` advances by `keep_count`.
        """
        start = self.block_start
        width = int(keep.shape[1])
        in_range = torch.arange(width, device=self.device)[None, :] < keep_count[:, None]
        src = start + torch.where(in_range, keep, torch.zeros_like(keep))
        for layer in self.cache.layers:
            for name in ("keys", "values"):
                states = getattr(layer, name)
                index = src[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[3])
                kept = torch.gather(states, 2, index)
                setattr(layer, name, torch.cat([states[:, :, :start], kept], dim=2))
        self.slot_pos = torch.cat([self.slot_pos[:, :start], torch.gather(self.slot_pos, 1, src)], dim=1)
        self.slot_valid = torch.cat([self.slot_valid[:, :start], in_range], dim=1)
        self.next_pos = self.next_pos + keep_count
        self.begin_block()

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only these sequences of the batch, and drop cache columns no remaining sequence uses."""
        columns = self.slot_valid.index_select(0, rows).any(dim=0).nonzero().squeeze(1)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, rows).index_select(2, columns)
            layer.values = layer.values.index_select(0, rows).index_select(2, columns)
        self.slot_valid = self.slot_valid.index_select(0, rows).index_select(1, columns)
        self.slot_pos = self.slot_pos.index_select(0, rows).index_select(1, columns)
        self.next_pos = self.next_pos.index_select(0, rows)
        self.begin_block()
