"""A lean decoder layer for drafts: the same arithmetic as a stock Llama/Qwen2 layer in far fewer torch calls.

A 0.5B draft at one to a few tokens per forward is dominated less by its matmuls than by what surrounds them: a
stock `transformers` layer makes ~75 torch calls (RMSNorm alone is eight elementwise ops, rotary embedding fourteen)
through a dozen module calls with keyword plumbing, and on a 2-core CPU each call costs microseconds of dispatch and
Python. `use_lean_layers(model)` swaps every supported decoder layer for `LeanDecoderLayer`, which keeps the layer's
own modules and weights and runs

    x + o_proj(attention(rope(qkv(rms_norm(x)))))  then  x + down(silu(gate) * up)(rms_norm(x))

with one fused q/k/v matmul and one gate/up matmul (from `castspec.models.fuse`), `F.rms_norm` (one op, the same
formula), the rotary embedding applied to queries and keys in one pass (`x cos + roll(x) sin'`, the tables made once
per forward), and torch's int8 linear op called without its module wrapper. The KV cache and the attention function
are the model's own (`past_key_values.update`, the registered attention implementation), so the runner, its masks
and cache are untouched. For drafts only: the draft just proposes, and its logits agree with the stock layer's to
float rounding (tested); a target keeps its stock layers.

Supported: layers with `self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj` with SiLU, and RMSNorm
`input_layernorm`/`post_attention_layernorm` (Llama, Qwen2, Mistral-style), full attention, default rotary; other
layers (query/key norms, sliding windows, soft-capping, ...) are left stock.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from castspec.models.fuse import FusedPart, fuse_projections
from castspec.models.gguf_format import can_share_input, projections

__all__ = ["LeanDecoderLayer", "use_lean_layers"]


def _rms_eps(norm: nn.Module) -> float | None:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    weight = getattr(norm, "weight", None)
    if eps is None or not isinstance(weight, torch.Tensor) or not type(norm).__name__.endswith("RMSNorm"):
        return None
    if getattr(norm, "with_scale", True) is False or hasattr(norm, "offset"):
        return None
    return float(eps)


def supported(layer: nn.Module, config) -> bool:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        return False
    if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "layer_idx")):
        return False
    if any(hasattr(attn, n) for n in ("q_norm", "k_norm")) or getattr(attn, "sliding_window", None):
        return False
    if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return False
    if type(getattr(mlp, "act_fn", None)).__name__ not in ("SiLUActivation", "SiLU"):
        return False
    if set(dict(layer.named_children())) != {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}:
        return False
    if _rms_eps(layer.input_layernorm) is None or _rms_eps(layer.post_attention_layernorm) is None:
        return False
    rope = getattr(config, "rope_parameters", None) or {}
    return rope.get("rope_type", "default") == "default" and not getattr(config, "attn_logit_softcapping", None)


class LeanDecoderLayer(nn.Module):
    """Runs a stock decoder layer's modules with fewer torch calls (module docstring). The stock layer's modules
    stay its children under their own names, so kernel transforms and weight sharing see the same modules."""

    def __init__(self, layer: nn.Module, config):
        super().__init__()
        self.input_layernorm = layer.input_layernorm
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.self_attn = layer.self_attn
        self.mlp = layer.mlp
        attn = layer.self_attn
        self.layer_idx = attn.layer_idx
        self.head_dim = attn.head_dim
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.hidden = config.hidden_size
        self.eps1 = _rms_eps(layer.input_layernorm)
        self.eps2 = _rms_eps(layer.post_attention_layernorm)
        self.scaling = attn.scaling
        self.config = config
        self.half = self.head_dim // 2
        self._shared: dict = {}  # per-forward tables shared by the model's lean layers (set by use_lean_layers)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, past_key_values=None,
                **kwargs) -> torch.Tensor:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        # Submodules through `_modules` (a dict lookup, not nn.Module.__getattr__): always the current ones, also
        # after a kernel transform replaced them.
        attn, mlp = self._modules["self_attn"], self._modules["mlp"]
        batch, n, _ = hidden_states.shape
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        h = self._norm(hidden_states, self._modules["input_layernorm"].weight, self.eps1)
        qkv = _projections(attn, ("q_proj", "k_proj", "v_proj"), h).view(batch, n, heads + 2 * kv_heads, dim)
        cos, sin = self._rope_tables(position_embeddings)
        qk = qkv[:, :, : heads + kv_heads]
        qk = torch.addcmul(qk * cos, qk.roll(self.half, dims=-1), sin)  # x cos + rotate_half(x) sin
        query = qk[:, :, :heads].transpose(1, 2)
        key = qk[:, :, heads:].transpose(1, 2)
        value = qkv[:, :, heads + kv_heads:].transpose(1, 2)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        out, _ = attention(attn, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        hidden_states = hidden_states + _linear(attn._modules["o_proj"], out.reshape(batch, n, heads * dim))
        h = self._norm(hidden_states, self._modules["post_attention_layernorm"].weight, self.eps2)
        gate, up = _projections(mlp, ("gate_proj", "up_proj"), h).chunk(2, dim=-1)
        return hidden_states + _linear(mlp._modules["down_proj"], F.silu(gate) * up)

    def _rope_tables(self, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """cos and sign-folded sin [B, n, 1, d] for this forward, made by the first layer and shared by the rest
        (x cos + rotate_half(x) sin = x cos + roll(x, d/2) sin', with sin' = (-sin[:d/2], sin[d/2:]))."""
        cos, sin = position_embeddings
        shared = self._shared
        if shared.get("key") is not cos:
            signed = torch.cat([-sin[..., : self.half], sin[..., self.half:]], dim=-1)
            shared.update(key=cos, tables=(cos[:, :, None], signed[:, :, None]))
        return shared["tables"]

    def _norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm as the stock modules compute it: in float32, then the weight in the input's dtype."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, (self.hidden,), weight, eps)
        return weight * F.rms_norm(x.float(), (self.hidden,), None, eps).to(x.dtype)


def _linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)`; torch's dynamic int8 linear called straight (its module wrapper costs ~10 us per call)."""
    if type(module) is _dynamic_int8_linear() and module.version is not None and module.version >= 4 \
            and module._packed_params.dtype == torch.qint8 and x.dtype == torch.float32:
        return torch.ops.quantized.linear_dynamic(x, module._packed_params._packed_params, True)
    return module(x)


@functools.cache
def _dynamic_int8_linear() -> type | None:
    try:
        import torch.ao.nn.quantized.dynamic as nnqd
    except ImportError:  # pragma: no cover - torch without quantization
        return None
    return nnqd.Linear


def _projections(parent: nn.Module, names: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
    """The named projections' outputs side by side: one call of the fused linear when they are one fused group."""
    members = [parent._modules[name] for name in names]
    if can_share_input(members):
        return projections(members, x)
    first = members[0]
    if isinstance(first, FusedPart) and "fused" in first._modules and all(
            isinstance(m, FusedPart) and m._group is first._group for m in members):
        return _linear(first._modules["fused"], x)
    return torch.cat([m(x) for m in members], dim=-1)


def use_lean_layers(model: nn.Module) -> int:
    """Fuse the projections (`fuse_projections`) and make every supported decoder layer a `LeanDecoderLayer`, in
    place; returns how many layers were replaced. Call before the kernel transforms (int8, oneDNN)."""
    if decoder_layers(model) is None:
        return 0
    fuse_projections(model)
    return replace_layers(model, LeanDecoderLayer, supported)


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The model's decoder layers, when its attention goes through the attention interface (not eager)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or getattr(model.config, "_attn_implementation", None) in (None, "eager"):
        return None
    return layers


def replace_layers(model: nn.Module, kind: type[LeanDecoderLayer], eligible) -> int:
    """Make every decoder layer that is not a `kind` yet and is `eligible(layer, config)` a `kind`, in place, all
    sharing one dict of per-forward tables; returns how many."""
    layers = decoder_layers(model)
    shared: dict = {}
    count = 0
    for i, layer in enumerate(layers if layers is not None else []):
        if isinstance(layer, kind) or not eligible(layer, model.config):
            continue
        layers[i] = kind(layer, model.config)
        layers[i]._shared = shared
        count += 1
    return count
