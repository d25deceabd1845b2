"""A preallocated KV cache written in place, where every row holds exactly its own accepted tokens.

One buffer per model, `kv[layer, key/value, row, head, slot, dim]`, allocated once (it grows only if a request
outlives its reserve). Row b's committed tokens occupy slots `[0, length[b])` — no padding, so a token's slot is
its position. A decoding step writes a *block* of speculative tokens after each row's own length (the block has the
same width for every row: every forward writes the same number of tokens per row); `commit` then moves each row's
accepted block slots to `length[b], length[b] + 1, ...` — at most depth + 1 vectors per layer per row — and forgets
the rest of the block. Nothing copies the whole cache per step: attention reads a view of the buffer, new tokens are
written into free slots, and only a row leaving the batch moves the rows after it.

The cache plugs into a stock Hugging Face model through the `Cache.update` hook every attention layer calls; no
modeling file is patched. Which slots a query may see is the runner's business (`castspec.models.runner`): slots
past a row's length that are not in its block hold stale data and are always masked.

Beside the keys and values the cache keeps the token id of every slot (`ids`), moved by the same commits, so a row
that leaves can be kept as a `Prefix` and a later prompt that starts with the same tokens (the next turn of a chat,
a shared system prompt) seeds a fresh cache with them instead of running them again (`CausalLMRunner.prefill`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class _LayerView(CacheLayerMixin):
    """What `transformers` sees of one layer: lengths for its bookkeeping; the data lives in the shared buffer."""

    is_sliding = False

    def __init__(self, cache: TreeKVCache):
        super().__init__()
        self.cache = cache
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):  # pragma: no cover - TreeKVCache.update is used
        raise NotImplementedError

    def get_seq_length(self) -> int:
        return self.cache.max_length + self.cache.block

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


@dataclass
class Prefix:
    """One row's committed tokens, kept after the row left: ids [L] and keys/values [layers, 2, 1, H_kv, L, d]."""

    ids: torch.Tensor
    kv: torch.Tensor

    def shared_length(self, prompt: list[int]) -> int:
        """How many leading tokens of `prompt` this prefix holds (the longest common prefix)."""
        n = min(len(prompt), self.ids.shape[0])
        if n == 0:
            return 0
        differ = (self.ids[:n].cpu() != torch.tensor(prompt[:n], dtype=torch.long)).nonzero()
        return int(differ[0, 0]) if differ.numel() else n

    def extends(self, other: Prefix) -> bool:
        """Whether `other`'s tokens are the first tokens of this one (this prefix makes `other` redundant)."""
        n = other.ids.shape[0]
        return n <= self.ids.shape[0] and torch.equal(self.ids[:n], other.ids.to(self.ids.device))


class TreeKVCache(Cache):
    """Per-row lengths, an in-place speculative block, and commits that move only the accepted entries."""

    def __init__(self, num_layers: int, batch_size: int, capacity: int, device: torch.device, dtype: torch.dtype,
                 align: int = 1):
        """`align`: attention sees a multiple of this many slots (the extra ones unused and masked), so that
        canonical attention reads whole chunks in place."""
        super().__init__(layers=[_LayerView(self) for _ in range(num_layers)])
        self.align = align
        self.num_layers, self.capacity = num_layers, max(int(capacity), 1)
        self.device, self.dtype = torch.device(device), dtype
        self.kv: torch.Tensor | None = None  # allocated at the first write, when head count and size are known
        self.length = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # committed tokens per row
        # token id in each slot, -1 where unknown (written by a forward that gave none, or never written)
        self.ids = torch.full((batch_size, self.capacity), -1, dtype=torch.long, device=self.device)
        self.max_length = 0  # host copies of max/min of `length`: slicing needs Python ints, not tensors
        self.min_length = 0
        self.block = 0  # speculative slots written since the last commit (the same count for every row)
        self._write: slice | torch.Tensor | None = None  # where the forward in progress writes

    @property
    def batch_size(self) -> int:
        return self.length.shape[0]

    # --- one forward -----------------------------------------------------------------------------------------
    def begin_write(self, count: int, tokens: torch.Tensor | None = None) -> int:
        """Reserve `count` new block slots per row for the next forward, which feeds `tokens` [B, count] (their ids
        are recorded; None: unknown); returns the slots attention will see."""
        end = -(-(self.max_length + self.block + count) // self.align) * self.align
        self._ensure_capacity(end)
        if self.min_length == self.max_length:  # every row equally long: a plain slice, the common case
            start = self.max_length + self.block
            self._write = slice(start, start + count)
            self.ids[:, self._write] = -1 if tokens is None else tokens
        else:
            offsets = torch.arange(self.block, self.block + count, device=self.device)
            self._write = self.length[:, None] + offsets  # [B, count]
            self.ids.scatter_(1, self._write, torch.full_like(self._write, -1) if tokens is None else tokens)
        return end

    def end_write(self, count: int) -> None:
        self.block += count
        self._write = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's keys/values [B, H, n, d] into their slots; return views over the visible slots."""
        if self.kv is None:
            self._allocate(key_states)
        layer = self.kv[layer_idx]
        if isinstance(self._write, slice):
            layer[0, :, :, self._write] = key_states
            layer[1, :, :, self._write] = value_states
        else:
            rows = torch.arange(self.batch_size, device=self.device)[:, None]
            layer[0, rows, :, self._write] = key_states.transpose(1, 2)
            layer[1, rows, :, self._write] = value_states.transpose(1, 2)
        end = -(-(self.max_length + self.block + key_states.shape[2]) // self.align) * self.align
        return layer[0, :, :, :end], layer[1, :, :, :end]

    def buffer(self, kv_heads: int, head_dim: int) -> torch.Tensor:
        """The whole buffer [layers, 2, B, H_kv, capacity, d], allocated now if nothing was written yet: for layers
        that write their keys and values into it themselves (`castspec.models.native_layer`), at `write_slots`."""
        if self.kv is None:
            self.kv = torch.zeros(self.num_layers, 2, self.batch_size, kv_heads, self.capacity, head_dim,
                                  dtype=self.dtype, device=self.device)
        return self.kv

    def write_slots(self) -> torch.Tensor:
        """[B, count] the slots the forward in progress writes (between `begin_write` and `end_write`)."""
        if isinstance(self._write, slice):
            slots = torch.arange(self._write.start, self._write.stop, device=self.device)
            return slots.expand(self.batch_size, -1)
        return self._write

    def _allocate(self, key_states: torch.Tensor) -> None:
        _, heads, _, head_dim = key_states.shape
        self.kv = torch.zeros(self.num_layers, 2, self.batch_size, heads, self.capacity, head_dim,
                              dtype=key_states.dtype, device=self.device)

    def _ensure_capacity(self, slots: int) -> None:
        """Grow the buffer (a rare full copy) when a row needs more slots than were reserved."""
        if slots <= self.capacity:
            return
        self.capacity = max(slots, 2 * self.capacity)
        self.ids = torch.cat([self.ids, self.ids.new_full((self.batch_size, self.capacity - self.ids.shape[1]), -1)],
                             dim=1)
        if self.kv is not None:
            old, used = self.kv, self.max_length + self.block
            self.kv = torch.zeros(*old.shape[:4], self.capacity, old.shape[5], dtype=old.dtype, device=self.device)
            self.kv[..., :used, :] = old[..., :used, :]

    # --- between steps ---------------------------------------------------------------------------------------
    def commit(self, keep: torch.Tensor, keep_count: torch.Tensor) -> None:
        """Keep, per row, block slots `keep[b, :keep_count[b]]` (block-relative, ascending): they move to the slots
        right after the row's committed tokens; the rest of the block is forgotten."""
        width = keep.shape[1]
        if width and self.kv is not None:
            column = torch.arange(width, device=self.device)[None, :]
            dst = self.length[:, None] + column
            src = torch.where(column < keep_count[:, None], self.length[:, None] + keep, dst)
            rows = torch.arange(self.batch_size, device=self.device)[:, None]
            # a kept chain already sits where it belongs (the common case on the CPU, where checking costs no sync)
            if self.device.type != "cpu" or not torch.equal(src, dst):
                self.kv[:, :, rows, :, dst] = self.kv[:, :, rows, :, src]  # gathered first, so overlaps are safe
                self.ids[rows, dst] = self.ids[rows, src]
        self.length = self.length + keep_count
        self.block = 0
        self._sync_lengths()

    def set_lengths(self, lengths: torch.Tensor) -> None:
        """Declare slots `[0, lengths[b])` committed (after a prefill that wrote them in place)."""
        self.length = lengths.to(device=self.device, dtype=torch.long)
        self.block = 0
        self._sync_lengths()

    def discard_block(self) -> None:
        """Forget the uncommitted speculative slots."""
        self.block = 0

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows (ascending), compacted to the front; only rows that change place are copied."""
        moves = [(new, old) for new, old in enumerate(rows) if new != old]
        if moves and self.kv is not None:
            used = self.max_length + self.block
            for new, old in moves:  # ascending, old >= new: a source is never overwritten before it is read
                self.kv[:, :, new, :, :used] = self.kv[:, :, old, :, :used]
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.ids = self.ids.index_select(0, index)
        self.length = self.length.index_select(0, index)
        if self.kv is not None:
            self.kv = self.kv[:, :, : len(rows)]
        self._sync_lengths()

    def append_rows(self, other: TreeKVCache) -> None:
        """Append `other`'s rows after this cache's (both between steps): one copy into a buffer sized for both,
        which happens only when sequences join a live batch."""
        if self.block or other.block:
            raise RuntimeError("rows can only join between steps")
        capacity = max(self.capacity, other.capacity)
        parts = [c for c in (self, other) if c.kv is not None]
        if parts:
            ref = parts[0].kv
            rows = self.batch_size + other.batch_size
            kv = torch.zeros(*ref.shape[:2], rows, ref.shape[3], capacity, ref.shape[5], dtype=ref.dtype,
                             device=self.device)
            for start, cache in ((0, self), (self.batch_size, other)):
                if cache.kv is not None:
                    used = cache.max_length
                    kv[:, :, start:start + cache.batch_size, :, :used] = cache.kv[..., :used, :]
            self.kv = kv
        self.capacity = capacity
        ids = self.ids.new_full((self.batch_size + other.batch_size, capacity), -1)
        ids[: self.batch_size, : self.ids.shape[1]] = self.ids
        ids[self.batch_size:, : other.ids.shape[1]] = other.ids.to(self.device)
        self.ids = ids
        self.length = torch.cat([self.length, other.length.to(self.device)])
        self._sync_lengths()

    # --- prefixes kept across requests ---------------------------------------------------------------------
    def prefix_of(self, row: int, copy: bool = True) -> Prefix | None:
        """Row `row`'s committed tokens as a `Prefix`; None if none of them is known. `copy=False` when nothing will
        write this buffer again (the cache is being dropped): the prefix then views it."""
        length = int(self.length[row])
        known = self.ids[row, :length] >= 0
        if self.kv is None or length == 0 or not bool(known[0]):
            return None
        length = length if bool(known.all()) else int((~known).nonzero()[0, 0])  # up to the first unknown id
        kv = self.kv[:, :, row:row + 1, :, :length]
        return Prefix(self.ids[row, :length].clone(), kv.clone() if copy else kv)

    def seed(self, prefix: Prefix, count: int) -> None:
        """Start this (single-row, empty) cache with `prefix`'s first `count` tokens committed."""
        if self.batch_size != 1 or self.max_length or self.block:
            raise RuntimeError("only an empty one-row cache can be seeded with a prefix")
        self._ensure_capacity(count)
        kv = self.buffer(prefix.kv.shape[3], prefix.kv.shape[5])
        kv[..., :count, :] = prefix.kv[..., :count, :].to(kv.device)
        self.ids[0, :count] = prefix.ids[:count].to(self.device)
        self.set_lengths(torch.tensor([count], dtype=torch.long))

    def _sync_lengths(self) -> None:
        low, high = torch.aminmax(self.length) if self.length.numel() else (torch.tensor(0), torch.tensor(0))
        self.min_length, self.max_length = int(low), int(high)
