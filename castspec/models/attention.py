"""Grouped-query attention over a tree mask without copying the KV cache.

Stock `transformers` SDPA attention, given an explicit mask and more than one query token, expands the cached keys
and values of every grouped-query layer to all query heads (`repeat_kv`) before calling SDPA: a full copy of the
cache per layer per forward. Tree verification and draft expansion always run that way (several tokens, a 4D tree
mask), and the copy grows with batch x context: at batch 8 and 1024 cached tokens it was most of the forward's time
on the CPU here (a 2-token forward cost 4x a 1-token one; single-token decoding already avoids the copy).

`grouped_sdpa_attention` folds each group's query heads into the query axis instead: queries [B, H, n, d] become
[B, H_kv, (H / H_kv) * n, d], the mask (shared by the heads) is tiled to match, and SDPA runs directly on the
cached [B, H_kv, S, d] keys and values. Same arithmetic per (head, query, key), no cache copy. It is registered
with `transformers`' attention interface (a stock extension point; no modeling file is touched) and falls back to
the stock SDPA function whenever its preconditions do not hold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTENTION_NAME = "castspec_grouped_sdpa"


def grouped_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, n, _ = query.shape
    usable = (groups > 1 and n > 1 and attention_mask is not None and attention_mask.dim() == 4
              and attention_mask.shape[1] == 1 and dropout == 0.0 and kwargs.get("position_bias") is None
              and kwargs.get("cache") is None and key.shape[1] * groups == heads)
    if not usable:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    folded = query.reshape(batch, heads // groups, groups * n, query.shape[-1])
    mask = attention_mask[:, :, :, : key.shape[2]].repeat(1, 1, groups, 1)
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
    out = out.reshape(batch, heads, n, value.shape[-1]).transpose(1, 2).contiguous()
    return out, None


def use_grouped_attention(model: torch.nn.Module) -> bool:
    """Switch a model that runs stock SDPA attention to `grouped_sdpa_attention`; False if it runs something else."""
    config = model.config
    if getattr(config, "_attn_implementation", None) == ATTENTION_NAME:
        return True
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if getattr(config, "num_key_value_heads", None) in (None, getattr(config, "num_attention_heads", None)):
        return False  # no grouped heads: nothing to save
    AttentionInterface.register(ATTENTION_NAME, grouped_sdpa_attention)
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
