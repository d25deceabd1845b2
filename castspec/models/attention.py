"""Attention over a tree mask: no KV copy for grouped heads, and, for targets, a result per query that is bitwise the
same whichever other queries share the forward and wherever its keys sit in the cache.

Stock `transformers` SDPA attention has two problems for tree verification:

* Given an explicit mask and several query tokens, it expands the cached keys and values of every grouped-query
  layer to all query heads (`repeat_kv`): a full copy of the cache per layer per forward (at batch 8 and 1024 cached
  tokens that copy was most of the forward's time on the CPU here). Folding each group's query heads into the query
  axis (queries [B, H, n, d] -> [B, H_kv, (H / H_kv) * n, d], mask tiled to match) avoids it.
* A query's result depends on its neighbours and on the layout of its keys: torch's kernels block the query axis, a
  single query takes a matrix-vector path, and floating-point sums follow the key *slots*, while a tree node's
  ancestors sit at other slots (with siblings in between) than the same tokens decoded one by one. In float32 that is
  a near-tie flip now and then; in an integer target format activations are re-quantized at every linear, so one ulp
  can cross a rounding step: on the int8 Qwen2.5-Coder-1.5B target, 7 of 8 HumanEval completions from `cast` left
  plain decoding within 128 tokens (logit gaps up to 0.6) until this module computed attention canonically.

Canonical attention (`KeyLayout` given, as the runner does for targets): a query at position p attends to its keys
in *position* order 0..p, cut into fixed chunks of `CHUNK` positions counted from 0. Scores are exact dot products;
the maximum is order-free; each chunk contributes exp-sums and an exp-weighted sum of values computed on a full
`CHUNK`-wide block (positions the query does not see contribute exact zeros), and the chunks are added in order.
Chunks whose keys sit at the slot of their position (the committed prefix, and any linear block: prefill, chains,
plain decoding) are read in place; the rest (the tree part) are gathered per query. Plain decoding and tree
verification then run the same arithmetic on the same numbers, so a node's logits equal, bitwise, those of its path
decoded alone (tests pin this). A product never has a single row (a zero row is added): the matrix-vector path sums
in another order.

Registered with `transformers`' attention interface (a stock extension point; no modeling file is touched); falls
back to stock SDPA whenever its preconditions do not hold (no 4D mask, dropout, soft-capping, extra inputs).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from castspec.errors import CastspecError

ATTENTION_NAME = "castspec_tree_attention"
CHUNK = 32  # positions per canonical chunk (a multiple of every SIMD width, so no scalar tails in elementwise ops)
QUERY_CHUNK = 1024  # folded query rows per product: bounds memory on long prompts (rows are independent)
CAUSAL_SLICE = 2 * CHUNK  # queries per slice of a long linear block: each slice reads only the chunks it can see


@dataclass
class KeyLayout:
    """Where each query's keys are, in position order, for one forward (shared by all layers).

    `in_place` [B]: positions below it (a multiple of CHUNK) sit at the slot of their position for every query of the
    row, and each query sees exactly those below its own position. `tail` [B, n, W]: the slot holding position
    `in_place + t` for query n (W a multiple of CHUNK), valid where `tail_valid`.
    """

    in_place: torch.Tensor
    tail: torch.Tensor
    tail_valid: torch.Tensor
    in_place_max: int  # max of `in_place` (host value, read once per forward)
    reach: list[int] = field(default_factory=list)  # per query index: 1 + the furthest position any row's query sees
    cache: dict = field(default_factory=dict)  # per-forward inputs shared by the layers

    def in_place_end(self, queries: slice) -> int:
        """The in-place positions these queries can see at all: chunks past them would add exact zeros, so a slice
        of a prefill reads only the chunks up to its own (about half the work of a long prompt's attention)."""
        reach = max(self.reach[queries], default=0)
        return min(self.in_place_max, -(-reach // CHUNK) * CHUNK)


def tree_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                   is_causal: bool | None = None, castspec_layout: KeyLayout | None = None,
                   **kwargs) -> tuple[torch.Tensor, None]:
    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, n, head_dim = query.shape
    usable = (attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[1] == 1
              and attention_mask.dtype != torch.bool and dropout == 0.0 and kwargs.get("position_bias") is None
              and kwargs.get("cache") is None and key.shape[1] * groups == heads and kwargs.get("softcap") is None
              and getattr(module, "attn_logit_softcapping", None) is None)
    if not usable or (castspec_layout is None and (groups == 1 or n == 1)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = head_dim ** -0.5 if scaling is None else scaling
    mask = attention_mask[:, :, :, : key.shape[2]]
    if castspec_layout is None:  # drafts: fast, no cache copy, not canonical
        folded = query.reshape(batch, heads // groups, groups * n, head_dim)
        out = F.scaled_dot_product_attention(folded, key, value, attn_mask=mask.repeat(1, 1, groups, 1), scale=scale)
        out = out.reshape(batch, heads, n, head_dim)
    else:
        step = max(1, QUERY_CHUNK // groups)
        if n > step and castspec_layout.tail.shape[-1] == 0:
            step = CAUSAL_SLICE  # a long linear block (prefill): later slices see more chunks, earlier ones fewer
        out = torch.cat([_canonical(query[:, :, i:i + step], key, value, mask[:, :, i:i + step], scale,
                                    castspec_layout, slice(i, i + step)) for i in range(0, n, step)], dim=2)
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def row_tile(head_dim: int, dtype: torch.dtype, device: str) -> int:
    """The row count whose multiples make this machine's matmuls row-independent, found by measurement.

    BLAS kernels compute a product in tiles of rows; leftover rows (and single rows) take other kernels with another
    summation order, so a row's result can depend on how many rows share the product. Products with a multiple of the
    tile's height agree row for row. Tried on the two product shapes canonical attention uses.
    """
    generator = torch.Generator().manual_seed(0)
    shapes = [(head_dim, CHUNK), (CHUNK, head_dim)]
    for tile in (4, 8, 16, 32, 64):
        ok = True
        for inner, cols in shapes:
            a = torch.rand(6 * tile, inner, generator=generator).to(device=device, dtype=dtype)
            b = torch.randn(inner, cols, generator=generator).to(device=device, dtype=dtype)
            whole = a @ b
            for rows in (tile, 2 * tile, 3 * tile):
                starts = range(0, 6 * tile - rows + 1, tile)
                ok &= all(torch.equal(a[i:i + rows] @ b, whole[i:i + rows]) for i in starts)
        if ok:
            return tile
    raise CastspecError(f"no row tile makes {dtype} matmuls on {device} row-independent here: canonical attention "
                        "cannot be exact on this machine")


def _pad_rows(x: torch.Tensor, tile: int) -> torch.Tensor:
    """Zero rows appended along dim -2 up to a multiple of `tile` (see `row_tile`)."""
    extra = -x.shape[-2] % tile
    if not extra:
        return x
    return torch.cat([x, x.new_zeros(*x.shape[:-2], extra, x.shape[-1])], dim=-2)


def _canonical(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float,
               layout: KeyLayout, queries: slice) -> torch.Tensor:
    """Attention of queries [B, H, n, d] in canonical order (module docstring); returns [B, H, n, d].

    Every product has the same shape but for its row count, a multiple of `row_tile`: [rows, d] x [d, CHUNK] for
    scores and [rows, CHUNK] x [CHUNK, d] for values. Rows are ordered (query, head of the group).
    """
    batch, heads, n, head_dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    rows = n * groups
    tile = row_tile(head_dim, query.dtype, str(query.device))
    per_query = query.reshape(batch, kv_heads, groups, n, head_dim).transpose(2, 3)  # [B, H_kv, n, G, d]
    row_mask = _in_place_mask(layout, mask, queries, groups, tile)
    scores = _in_place_scores(per_query, key, row_mask, scale, tile) if row_mask.shape[2] else None
    if layout.tail.shape[-1] == 0:  # every key in place: prefill, chains, plain steps
        top = scores.amax(dim=(2, 4), keepdim=True)  # [B, H_kv, 1, rows (padded), 1]
        weights = torch.exp(scores - top)
        values = value[:, :, : weights.shape[2] * CHUNK].reshape(batch, kv_heads, -1, CHUNK, head_dim)
        total = weights.sum(dim=-1, keepdim=True).cumsum(dim=2)[:, :, -1]  # a sequential scan over the chunks
        weighted = torch.matmul(weights, values).cumsum(dim=2)[:, :, -1]
        out = (weighted / total.clamp_min(torch.finfo(total.dtype).tiny))[:, :, :rows]
    else:
        out = _with_tail(per_query, key, value, mask, scale, layout, queries, scores, tile)
    return out.reshape(batch, kv_heads, n, groups, head_dim).transpose(2, 3).reshape(batch, heads, n, head_dim)


def _with_tail(per_query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float,
               layout: KeyLayout, queries: slice, scores: torch.Tensor | None, tile: int) -> torch.Tensor:
    """Canonical attention when part of the keys is gathered per query (a tree); returns [B, H_kv, n * G, d]."""
    batch, kv_heads, n, groups, head_dim = per_query.shape
    rows = n * groups
    tail_keys, tail_values, tail_mask = _tail_inputs(layout, key, value, mask, queries)
    tail_scores = torch.matmul(_pad_rows(per_query, tile)[:, :, :, None], tail_keys.transpose(-1, -2)) * scale
    tail_scores = tail_scores + tail_mask  # [B, H_kv, n, W / CHUNK, Gp, CHUNK]
    top = tail_scores.amax(dim=(3, 5))[:, :, :, :groups].reshape(batch, kv_heads, rows)
    if scores is not None:
        top = torch.maximum(top, scores.amax(dim=(2, 4))[:, :, :rows])
    # softmax numerators and denominators, chunk by chunk, added in position order
    sums, parts = [], []
    if scores is not None:
        weights = torch.exp(scores - _pad_rows(top[..., None], tile)[:, :, None])  # [B, H_kv, chunks, rows, CHUNK]
        values = value[:, :, : weights.shape[2] * CHUNK].reshape(batch, kv_heads, -1, CHUNK, head_dim)
        sums.append(weights.sum(dim=-1)[:, :, :, :rows].transpose(2, 3))
        parts.append(torch.matmul(weights, values)[:, :, :, :rows].transpose(2, 3))
    top_per_query = _pad_rows(top.reshape(batch, kv_heads, n, groups, 1), tile)[:, :, :, None]
    tail_weights = torch.exp(tail_scores - top_per_query)
    sums.append(tail_weights.sum(dim=-1)[..., :groups].permute(0, 1, 2, 4, 3).reshape(batch, kv_heads, rows, -1))
    tail_parts = torch.matmul(tail_weights, tail_values)[:, :, :, :, :groups]  # [B, H_kv, n, Wc, G, d]
    parts.append(tail_parts.permute(0, 1, 2, 4, 3, 5).reshape(batch, kv_heads, rows, -1, head_dim))
    total = torch.cat(sums, dim=-1).cumsum(dim=-1)[..., -1:]  # a sequential scan: zero chunks change nothing
    weighted = torch.cat(parts, dim=-2).cumsum(dim=-2)[..., -1, :]
    return weighted / total.clamp_min(torch.finfo(total.dtype).tiny)


def _in_place_scores(per_query: torch.Tensor, key: torch.Tensor, row_mask: torch.Tensor, scale: float,
                     tile: int) -> torch.Tensor:
    """Masked scores of the chunks read in place: [B, H_kv, chunks, rows (padded), CHUNK]."""
    batch, kv_heads, n, groups, head_dim = per_query.shape
    chunks = row_mask.shape[2]
    rows = _pad_rows(per_query.reshape(batch, kv_heads, n * groups, head_dim), tile)
    keys = key[:, :, : chunks * CHUNK].reshape(batch, kv_heads, chunks, CHUNK, head_dim)
    return torch.matmul(rows[:, :, None], keys.transpose(-1, -2)) * scale + row_mask


def _in_place_mask(layout: KeyLayout, mask: torch.Tensor, queries: slice, groups: int, tile: int) -> torch.Tensor:
    """The additive mask of the in-place chunks per row [B, 1, chunks, rows (padded), CHUNK]; slots at or past a
    row's `in_place` are masked (they are read through the tail). Built once per forward and mask."""
    key = (mask.data_ptr(), tuple(mask.shape), queries.start, queries.stop, groups, tile)
    if key not in layout.cache:
        end = layout.in_place_end(queries)
        batch = mask.shape[0]
        row_mask = _pad_rows(mask[:, :, :, :end].repeat_interleave(groups, dim=2), tile)  # [B, 1, rows, end]
        own = torch.arange(end, device=mask.device)[None, :] < layout.in_place[:, None]
        row_mask = torch.where(own[:, None, None, :], row_mask, torch.finfo(mask.dtype).min)
        layout.cache[key] = row_mask.reshape(batch, 1, row_mask.shape[2], end // CHUNK, CHUNK).transpose(2, 3)
    return layout.cache[key]


def _tail_inputs(layout: KeyLayout, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                 queries: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys, values [B, H_kv, n, W / CHUNK, CHUNK, d] and mask [B, 1, n, W / CHUNK, 1, CHUNK] of the chunks
    gathered per query, in position order."""
    tail, valid = layout.tail[:, queries], layout.tail_valid[:, queries]
    batch, n, width = tail.shape
    kv_heads, head_dim = key.shape[1], key.shape[3]
    index = tail.reshape(batch, 1, n * width, 1).expand(batch, kv_heads, n * width, head_dim)
    shape = (batch, kv_heads, n, width // CHUNK, CHUNK, head_dim)
    tail_mask = torch.where(valid, mask[:, 0].gather(2, tail), torch.finfo(mask.dtype).min)
    return (key.gather(2, index).reshape(shape), value.gather(2, index).reshape(shape),
            tail_mask.reshape(batch, 1, n, width // CHUNK, 1, CHUNK))


def key_layout(allowed: torch.Tensor, key_pos: torch.Tensor, query_pos: torch.Tensor,
               query_valid: torch.Tensor | None = None) -> KeyLayout:
    """The `KeyLayout` of a forward: `allowed` [B, n, S] which slots each query sees, `key_pos` [B, S] each slot's
    position, `query_pos` [B, n]; padding queries (`query_valid` False) are ignored."""
    batch, n, slots = allowed.shape
    device = allowed.device
    valid = torch.ones(batch, n, dtype=torch.bool, device=device) if query_valid is None else query_valid
    slot = torch.arange(slots, device=device)
    # a slot can be read in place if it holds its own position and exactly the queries at or after it see it
    expected = query_pos[:, :, None] >= key_pos[:, None, :]
    in_order = (key_pos == slot[None, :]) & ((allowed == expected) | ~valid[:, :, None]).all(dim=1)
    linear_run = in_order.long().cumprod(dim=1).sum(dim=1)
    in_place = torch.div(linear_run, CHUNK, rounding_mode="floor") * CHUNK
    need = torch.where(valid, query_pos + 1 - in_place[:, None], 0).amax()
    reach = torch.where(valid, query_pos + 1, 0).amax(dim=0)  # [n]
    in_place_max, need, *reach = torch.cat([torch.stack([in_place.max(), need]), reach]).tolist()  # one host read
    width = max(0, -(-need // CHUNK) * CHUNK)  # 0: every query's keys are in place (prefill, chains, plain steps)
    offset = key_pos[:, None, :] - in_place[:, None, None]
    keep = allowed & (slot[None, None, :] >= in_place[:, None, None]) & (offset >= 0) & (offset < width)
    target = torch.where(keep, offset, width)  # column `width` collects everything else and is dropped
    tail = torch.zeros(batch, n, width + 1, dtype=torch.long, device=device)
    tail.scatter_(2, target, slot.expand(batch, n, slots).contiguous())
    tail_valid = torch.zeros(batch, n, width + 1, dtype=torch.bool, device=device)
    tail_valid.scatter_(2, target, keep)
    return KeyLayout(in_place, tail[..., :width], tail_valid[..., :width], in_place_max, reach)


def use_tree_attention(model: torch.nn.Module) -> bool:
    """Switch a model that runs stock SDPA attention to `tree_attention`; False if it runs something else."""
    config = model.config
    if getattr(config, "_attn_implementation", None) == ATTENTION_NAME:
        return True
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(ATTENTION_NAME, tree_attention)
    _register_mask()
    model.set_attn_implementation(ATTENTION_NAME)
    return True


def _register_mask() -> None:
    """Our runner passes ready-made 4D masks; the name still needs an entry in the mask interface."""
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    except ImportError:  # pragma: no cover - older transformers
        return
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
