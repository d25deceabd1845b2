"""A q4k model's decoder layers as one native call each (`native/decoder_layer.cpp`): the runtime under the trees.

With its linears on Q4_K blocks (`castspec.models.gguf_format`) the 1.5B target's matmuls take ~47 ms per token on
a 2-core AVX2 host, but the ~25 torch calls per layer around them (norms, rotary, cache writes, canonical attention)
added ~40 ms more. `NativeDecoderLayer` hands the whole layer (norm, q/k/v, rotary, the in-place cache write,
attention, o_proj, norm, gate/up, SiLU, down, residuals) to one C++ function per layer; the stock model's forward
(embedding, the layer loop, final norm, lm_head) is unchanged and no modeling file is patched.

Exact to itself: the native layer computes every token on its own, in an order fixed by that token's numbers, and
its attention visits the token's keys in position order (the runner's `KeyLayout`: the committed prefix in place,
then the listed slots), so a tree node's output is bitwise that of its path decoded alone. The native path runs
whenever the runner gives a canonical layout and its `TreeKVCache` (targets); otherwise (no layout, another cache)
the layer runs as a `LeanDecoderLayer`. Both are never mixed within one cache: the choice depends on the runner
only, which is fixed per model.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_utils import slice_logits_to_keep

from castspec.models.gguf_format import GGUFLinear
from castspec.models.kv_cache import TreeKVCache
from castspec.models.lean import LeanDecoderLayer, replace_layers, supported

__all__ = ["NativeDecoderLayer", "NativeStack", "use_native_layers"]

# Model types whose forward is exactly embedding -> decoder layers -> final norm -> lm_head (no embedding scale,
# logit soft-capping or per-layer extras), so `NativeStack` may run it without the stock forward.
NATIVE_STACK_MODELS = ("qwen2", "llama")

_P, _I64, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
                ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


class _Proj(ctypes.Structure):
    _fields_ = [("w", _P), ("cols", _I64), ("k", _I64), ("q6", _I64), ("bias", _P), ("half", _I64)]


class _LayerSpec(ctypes.Structure):
    _fields_ = [*((name, _Proj) for name in ("q", "k", "v", "o", "gate", "up", "down")),
                ("norm1", _P), ("norm2", _P), ("eps1", _F32), ("eps2", _F32), ("scale", _F32), ("pad", _F32),
                ("hidden", _I64), ("heads", _I64), ("kv_heads", _I64), ("head_dim", _I64), ("inter", _I64)]


class _StepSpec(ctypes.Structure):
    _fields_ = [("batch", _I64), ("n", _I64), ("cos", _P), ("sin", _P), ("positions", _P), ("write_slot", _P),
                ("in_place", _P), ("tail", _P), ("tail_valid", _P), ("tail_width", _I64), ("capacity", _I64)]


class _Memo:
    """Values derived from tensors' addresses (ctypes structs): never copied or pickled with the model, so a copy
    starts empty and derives its own."""

    def __init__(self):
        self.key: object = None
        self.value: object = None

    def __deepcopy__(self, memo: dict) -> _Memo:
        return _Memo()

    def __getstate__(self) -> dict:
        return {"key": None, "value": None}


def _proj(module: GGUFLinear) -> _Proj:
    bias = module.bias.data_ptr() if module.bias is not None else None
    return _Proj(module.blocks.data_ptr(), module.out_features, module.padded_in, module.qtype == "Q6_K", bias,
                 module.half)


def native_supported(layer: nn.Module, config) -> bool:
    """A layer the native function can run: a lean-capable layer whose seven projections are GGUF linears with whole
    groups of 8 outputs and the layer's sizes, float32 norms, and a head size that is a multiple of 8."""
    if not (isinstance(layer, LeanDecoderLayer) or supported(layer, config)):
        return False
    members = [getattr(getattr(layer, parent), name) for parent, name in _PROJECTIONS]
    if not all(isinstance(m, GGUFLinear) and m.blocks.shape[0] * 8 == m.out_features for m in members):
        return False
    q, k, v, o, gate, up, down = members
    head_dim = layer.self_attn.head_dim
    inputs = (q, k, v, gate, up)  # one normed input each: same size and padding
    if any((m.in_features, m.padded_in) != (config.hidden_size, q.padded_in) for m in inputs) \
            or o.in_features != config.num_attention_heads * head_dim or down.in_features != gate.out_features \
            or gate.out_features != up.out_features:
        return False
    norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
    return head_dim % 8 == 0 and all(w.dtype == torch.float32 for w in norms) \
        and config.num_attention_heads % config.num_key_value_heads == 0


class NativeDecoderLayer(LeanDecoderLayer):
    """A decoder layer run by one native call when the runner attends canonically (module docstring)."""

    def __init__(self, layer: nn.Module, config):
        super().__init__(layer, config)
        self._spec = _Memo()  # the layer's `_LayerSpec`, keyed by its buffers' addresses

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, past_key_values=None,
                **kwargs) -> torch.Tensor:
        layout = kwargs.get("castspec_layout")
        if layout is None or not isinstance(past_key_values, TreeKVCache) or hidden_states.dtype != torch.float32 \
                or hidden_states.device.type != "cpu":
            return super().forward(hidden_states, attention_mask, position_embeddings, past_key_values, **kwargs)
        memo = self._shared.setdefault("native", _Memo())
        step, kv = _step(memo, layout, past_key_values, hidden_states, position_embeddings, kwargs["position_ids"],
                         self)
        hidden = hidden_states.contiguous().clone()
        layer_kv = kv[self.layer_idx]
        self._kernels().decoder_layer(ctypes.byref(self._layer_spec()), ctypes.byref(step), hidden.data_ptr(),
                                      layer_kv[0].data_ptr(), layer_kv[1].data_ptr())
        return hidden

    def _kernels(self):
        return self._modules["self_attn"]._modules["q_proj"]._kernels

    def _layer_spec(self) -> _LayerSpec:
        """The layer's weights as the native function takes them: pointers, made once (weights of a CPU model stay
        put; should the layer's modules be replaced, the new q_proj's address makes them again)."""
        key = self._modules["self_attn"]._modules["q_proj"].blocks.data_ptr()
        if key != self._spec.key:
            members = [self._modules[parent]._modules[name] for parent, name in _PROJECTIONS]
            norms = (self._modules["input_layernorm"].weight, self._modules["post_attention_layernorm"].weight)
            self._spec.value = _LayerSpec(*map(_proj, members), norms[0].data_ptr(), norms[1].data_ptr(), self.eps1,
                                          self.eps2, self.scaling, 0.0, self.hidden, self.heads, self.kv_heads,
                                          self.head_dim, members[4].out_features)
            self._spec.key = key
        return self._spec.value


def _step(memo: _Memo, layout, cache: TreeKVCache, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
          positions: torch.Tensor, layer: NativeDecoderLayer) -> tuple[_StepSpec, torch.Tensor]:
    """This forward's tokens as the native function takes them, made by the first layer and shared by the rest."""
    if memo.key is not layout:
        batch, n, _ = hidden.shape
        kv = cache.buffer(layer.kv_heads, layer.head_dim)
        capacity = kv.shape[4]
        if kv.stride()[2:] != (layer.kv_heads * capacity * layer.head_dim, capacity * layer.head_dim,
                               layer.head_dim, 1):
            raise RuntimeError("the KV cache's layout is not the one the native layers write")
        cos, sin = (t.float().expand(batch, n, layer.head_dim).contiguous() for t in rope)
        tensors = {
            "cos": cos, "sin": sin, "positions": positions.expand(batch, n).contiguous(),
            "write_slot": cache.write_slots().contiguous(), "in_place": layout.in_place.contiguous(),
            "tail": layout.tail.contiguous(), "tail_valid": layout.tail_valid.to(torch.uint8).contiguous(),
        }
        step = _StepSpec(batch, n, *(tensors[name].data_ptr() for name in
                                     ("cos", "sin", "positions", "write_slot", "in_place", "tail", "tail_valid")),
                         layout.tail.shape[-1], capacity)
        memo.key, memo.value = layout, (step, kv, tensors)  # the tensors stay alive while the step is in use
    return memo.value[0], memo.value[1]


def kept_rows(logits_to_keep: int | torch.Tensor, batch: int, n: int) -> torch.Tensor | None:
    """The rows of a [batch * n] forward whose outputs `logits_to_keep` keeps (as `slice_logits_to_keep` reads it),
    ascending, as int64 on the CPU; None when it keeps them all or too many for skipping the rest to pay (a prefill
    keeps one row per sequence: its last layer then projects the other rows' q, k and v only)."""
    if isinstance(logits_to_keep, torch.Tensor):
        if logits_to_keep.ndim != 2 or logits_to_keep.dtype == torch.bool:
            return None
        flat = logits_to_keep.cpu() + torch.arange(batch)[:, None] * n
    elif isinstance(logits_to_keep, int) and 0 < logits_to_keep < n:
        flat = torch.arange(n - logits_to_keep, n)[None, :] + torch.arange(batch)[:, None] * n
    else:
        return None
    rows = torch.unique(flat.reshape(-1).long())  # sorted
    return rows.contiguous() if rows.numel() * 2 <= batch * n else None


def use_native_layers(model: nn.Module) -> int:
    """Make every supported decoder layer of a q4k model a `NativeDecoderLayer`, in place; returns how many.
    Apply after `use_gguf_linears`."""
    return replace_layers(model, NativeDecoderLayer, native_supported)


class NativeStack:
    """A q4k model's whole forward without the stock per-layer machinery: embedding, one native call per layer on
    one hidden buffer, final norm, lm_head. The stock forward around native layers (mask preparation, module calls,
    keyword plumbing, a copy of the hidden state per layer) cost ~5 ms of a ~17 ms draft forward on a 2-core host.
    The arithmetic is the stock path's own modules and the same native calls, so the logits are bitwise the same."""

    def __init__(self, model: nn.Module, layers: list[NativeDecoderLayer]):
        self.model, self.layers = model, layers
        self._specs: list | None = None  # each layer's `_LayerSpec` by reference, made at the first forward

    @classmethod
    def of(cls, model: nn.Module) -> NativeStack | None:
        """The model's stack, when every decoder layer is native and the model type's forward is the plain one."""
        layers = getattr(getattr(model, "model", None), "layers", None)
        if getattr(model.config, "model_type", None) not in NATIVE_STACK_MODELS or not layers \
                or not all(isinstance(layer, NativeDecoderLayer) for layer in layers) \
                or len(layers) != model.config.num_hidden_layers:
            return None
        return cls(model, list(layers))

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: TreeKVCache, layout,
                logits_to_keep: int | torch.Tensor = 0,
                head: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Logits [B, n (or as kept), V], or `head` of the final normed hidden states [B, n, H] when given (a
        greedy head's token ids); None when the native path does not apply here (not float32 on the CPU): the
        caller then runs the stock forward."""
        inner = self.model.model
        hidden = inner.embed_tokens(tokens)
        if hidden.dtype != torch.float32 or hidden.device.type != "cpu":
            return None
        hidden = hidden.contiguous()
        kept = None if head is not None else kept_rows(logits_to_keep, *tokens.shape)
        self._run_layers(hidden, inner.rotary_emb(hidden, positions), positions, cache, layout, kept)
        hidden = inner.norm(hidden)
        if head is not None:
            return head(hidden)
        return self.model.lm_head(slice_logits_to_keep(hidden, logits_to_keep))  # the stock forward's own slicing

    def _run_layers(self, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor,
                    cache: TreeKVCache, layout, kept: torch.Tensor | None = None) -> None:
        """Every layer's native call on `hidden`, in place, with the pointers made once per forward (per layer
        they cost ~35 us of Python, ~1 ms per target forward). The layers' weights stay where they are once a
        runner holds the model (a model whose modules are replaced needs a new runner). `kept`: the flat rows
        whose output is used; the last layer then projects only q, k and v of the other rows."""
        first = self.layers[0]
        if self._specs is None:
            self._specs = [ctypes.byref(layer._layer_spec()) for layer in self.layers]
        step, kv = _step(first._shared.setdefault("native", _Memo()), layout, cache, hidden, rope, positions, first)
        run, step_ref, state = first._kernels().decoder_layer, ctypes.byref(step), hidden.data_ptr()
        base, size = kv.data_ptr(), kv.element_size()
        layer_bytes, value_offset = kv.stride(0) * size, kv.stride(1) * size
        kept_layer = self.layers[-1] if kept is not None else None
        for layer, spec in zip(self.layers, self._specs, strict=True):
            keys = base + layer.layer_idx * layer_bytes
            if layer is kept_layer:
                first._kernels().decoder_layer_kept(spec, step_ref, state, keys, keys + value_offset,
                                                    kept.data_ptr(), kept.numel())
            else:
                run(spec, step_ref, state, keys, keys + value_offset)
