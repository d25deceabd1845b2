"""Faster CPU kernels for stock Hugging Face causal LMs.

Two in-place model transforms, both inference-only:

- `use_fast_cpu_linears(model)`: every fp32 `nn.Linear` on CPU (lm_head included) becomes a `OneDNNLinear`, which
  keeps the weight pre-packed for oneDNN (`torch.ops.mkldnn._reorder_linear_weight` once, then
  `torch.ops.mkldnn._linear_pointwise` per call, the pair torch's inductor uses). Stock `F.linear` goes to MKL sgemm,
  which is slow on AMD CPUs for 2..64 rows, i.e. exactly the shape of verifying a handful of draft tokens; oneDNN is
  2-4x faster there and computes the same function (logits within ~2e-4, same argmax). On a 2-core AMD EPYC,
  Qwen2.5-Coder-1.5B with a 128-token cache, n new tokens: 374/764/822/763/856/1228 ms stock vs
  174/180/227/248/342/575 ms packed for n = 1/2/4/8/16/32.
- `quantize_draft_int8(model)`: every fp32 `nn.Linear` on CPU (lm_head included) becomes torch's dynamic int8
  linear with per-output-channel weight scales (fbgemm). This changes the model's outputs, so it is meant for a
  *draft* model only: the target still decides every token.

`describe_kernels(model)` names what a model runs ("stock", "onednn-fp32", "int8-dynamic", or several joined by "+"),
for recording next to measured costs.

Packed weights are snapshots: changing a weight in place after packing does not reach the packed copy. Tied
embeddings keep working: the embedding keeps its own (unpacked, fp32) weight in both transforms.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DEFAULT_BATCH_SIZE_HINT",
    "DEFAULT_MIN_ROWS",
    "OneDNNLinear",
    "describe_kernels",
    "quantize_draft_int8",
    "use_fast_cpu_linears",
]

# Row count oneDNN is told to expect when it picks the packed weight layout. With 2 threads on an AMD EPYC (Zen 4,
# AVX-512), shapes of Qwen2.5-0.5B/1.5B, M = 1..64 rows: any hint from 2 to 64, or none, gives the same blocked
# layout (AB16b64a) and the same times; a hint of 1 gives the plain layout, up to 1.8x slower from 4 rows up.
# 16 is inductor's choice for a batch of 16 and safe where the layouts differ.
DEFAULT_BATCH_SIZE_HINT: int | None = 16

# Inputs with fewer rows are zero-padded to this many: oneDNN's kernel for 1-3 rows streams the weight more slowly
# than its 4-row kernel, so 1-3 rows cost more than 4 (one decode step of Qwen2.5-0.5B: 91 ms at 1 row, 78 ms padded
# to 4; single 8960x1536 linear: 1.8 ms vs 1.45 ms). 0 or 1 disables padding.
DEFAULT_MIN_ROWS = 4

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------------------------
# oneDNN fp32 linears


def _pack(weight: torch.Tensor, batch_size_hint: int | None) -> torch.Tensor:
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), batch_size_hint)


@functools.cache
def _onednn_probe() -> str | None:
    """Why the packed oneDNN linear cannot be used here, or None if it works (checked once per process)."""
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN (mkldnn)"
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(24, 40, generator=generator)
        bias = torch.randn(24, generator=generator)
        x = torch.randn(3, 40, generator=generator)
        packed = _pack(weight, DEFAULT_BATCH_SIZE_HINT)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError) as exc:  # op missing, or not runnable here
        return f"oneDNN packed linear unavailable ({type(exc).__name__}: {exc})"
    if y.shape != (3, 24) or not torch.allclose(y, F.linear(x, weight, bias), atol=1e-4, rtol=1e-4):
        return "oneDNN packed linear gave wrong results on a self-test"
    return None


def _onednn_unavailable_reason() -> str | None:
    if not torch.backends.mkldnn.enabled:
        return "oneDNN is disabled (torch.backends.mkldnn.enabled is False)"
    return _onednn_probe()


class OneDNNLinear(nn.Module):
    """Drop-in for an fp32 CPU `nn.Linear` that multiplies with a oneDNN pre-packed weight.

    Inference only: no gradient flows through the packed op. `.weight` reads the weight (shape, dtype, values): it
    is the original `Parameter` when that was kept (tied weights, or `keep_weight=True`), otherwise a fresh dense
    copy unpacked on each access (the dense copy is dropped to halve memory). Inputs that are not fp32 CPU tensors
    fall back to `F.linear` on the dense weight. `copy.deepcopy` works; the copies share the (read-only) packed weight.
    Not serializable: `state_dict()` holds only the bias (and the weight when kept).
    """

    def __init__(self, linear: nn.Linear, batch_size_hint: int | None = DEFAULT_BATCH_SIZE_HINT,
                 keep_weight: bool = False, min_rows: int = DEFAULT_MIN_ROWS) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.batch_size_hint = batch_size_hint
        self.min_rows = min_rows
        # A plain attribute, not a buffer: the opaque oneDNN tensor supports neither `.to()` nor serialization.
        self._packed = _pack(linear.weight, batch_size_hint)
        if keep_weight:
            self._parameters["weight"] = linear.weight
        self.register_parameter("bias", linear.bias)  # the same Parameter object (or None)

    @property
    def weight(self) -> torch.Tensor:
        kept = self._parameters.get("weight")
        if kept is not None:
            return kept
        return self._packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if x.dtype != torch.float32 or x.device.type != "cpu" or (
                bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu")):
            weight = self.weight.to(x)
            return F.linear(x, weight, None if bias is None else bias.to(x))
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        n = rows.shape[0]
        if 0 < n < self.min_rows:
            rows = torch.cat([rows, rows.new_zeros(self.min_rows - n, self.in_features)])
        y = torch.ops.mkldnn._linear_pointwise(rows, self._packed, bias, "none", [], "")
        if y.shape[0] != n:
            y = y[:n]
        return y.view(*lead, self.out_features)

    def __deepcopy__(self, memo: dict) -> OneDNNLinear:
        # The opaque packed tensor cannot be deep-copied; it is never modified, so copies share it.
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = value if key == "_packed" else copy.deepcopy(value, memo)
        return new

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"batch_size_hint={self.batch_size_hint}, min_rows={self.min_rows}, "
                f"weight_kept={'weight' in self._parameters}")


def _shared_tensor_ids(model: nn.Module) -> set[int]:
    """Ids of parameters reachable from more than one place in `model`, or sharing storage with another one."""
    seen: dict[int, int] = {}
    by_storage: dict[tuple[int, int], set[int]] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
        if param.device.type != "meta":
            key = (param.untyped_storage().data_ptr(), param.untyped_storage().nbytes())
            by_storage.setdefault(key, set()).add(id(param))
    shared = {pid for pid, count in seen.items() if count > 1}
    for ids in by_storage.values():
        if len(ids) > 1:
            shared |= ids
    return shared


def _replace_modules(model: nn.Module, convert: Callable[[nn.Module], nn.Module | None]) -> int:
    """Replace every submodule for which `convert` returns a module; return how many distinct modules changed.

    Walks by name so that no list keeps the old modules alive (their weights are freed as we go). A module reachable
    under several parents is converted once and the same replacement is put everywhere.
    """
    slots = []
    uses: dict[int, int] = {}
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent.named_children():
            slots.append((parent_name, child_name))
            uses[id(child)] = uses.get(id(child), 0) + 1
    # Old modules reachable from several slots stay referenced here until the walk ends, so their ids stay unique.
    shared_done: dict[int, tuple[nn.Module, nn.Module]] = {}
    count = 0
    for parent_name, child_name in slots:
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:  # under a module replaced earlier in the walk
            continue
        child = getattr(parent, child_name, None)
        if child is None:
            continue
        if id(child) in shared_done:
            setattr(parent, child_name, shared_done[id(child)][1])
            continue
        new = convert(child)
        if new is None:
            continue
        for hooks in ("_forward_pre_hooks", "_forward_hooks"):
            getattr(new, hooks).update(getattr(child, hooks))
        new.train(child.training)
        if uses.get(id(child), 0) > 1:
            shared_done[id(child)] = (child, new)
        setattr(parent, child_name, new)
        count += 1
        del child, new
    return count


def _is_plain_linear(module: nn.Module) -> bool:
    # Exactly nn.Linear: subclasses (e.g. MultiheadAttention's out_proj, whose weight is read directly) are left alone.
    return type(module) is nn.Linear and not getattr(module, "parametrizations", None)


def use_fast_cpu_linears(model: nn.Module, *, batch_size_hint: int | None = DEFAULT_BATCH_SIZE_HINT,
                         keep_weights: bool = False, min_rows: int = DEFAULT_MIN_ROWS) -> int:
    """Make every fp32 CPU `nn.Linear` of `model` (lm_head included) a oneDNN pre-packed `OneDNNLinear`, in place.

    Returns how many layers were replaced. Layers on another device or in another dtype are left alone, so a CUDA
    or float64/bfloat16 model is untouched (returns 0). If oneDNN is unavailable, warns once and returns 0.
    A weight shared with another module (tied embeddings) stays a `Parameter` of both; other weights keep only the
    packed copy unless `keep_weights=True` (which doubles the memory of the linears). `batch_size_hint` and `min_rows`
    (inputs of fewer rows are zero-padded to this many, because it is faster) are per-layer tuning knobs; the
    defaults were the fastest measured.
    """
    candidates = [m for m in model.modules() if _is_plain_linear(m) and m.weight.dtype == torch.float32
                  and m.weight.device.type == "cpu"]
    if not candidates:
        return 0
    del candidates
    reason = _onednn_unavailable_reason()
    if reason is not None:
        _warn_once("onednn", f"castspec: keeping stock nn.Linear kernels: {reason}")
        return 0
    shared = _shared_tensor_ids(model)

    def convert(module: nn.Module) -> nn.Module | None:
        if not (_is_plain_linear(module) and module.weight.dtype == torch.float32
                and module.weight.device.type == "cpu"):
            return None
        return OneDNNLinear(module, batch_size_hint, keep_weight=keep_weights or id(module.weight) in shared,
                            min_rows=min_rows)

    return _replace_modules(model, convert)


# ---------------------------------------------------------------------------------------------------------------
# int8 dynamic quantization (drafts only)


@functools.cache
def _int8_backend() -> tuple[type, object, str] | str:
    """(dynamic Linear class, per-channel qconfig, engine), or why int8 is unavailable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization announces its move to torchao on import
            import torch.ao.nn.quantized.dynamic as nnqd
            from torch.ao.quantization import per_channel_dynamic_qconfig
    except (ImportError, AttributeError) as exc:
        return f"torch.ao.quantization is unavailable ({type(exc).__name__}: {exc})"
    engines = torch.backends.quantized.supported_engines
    engine = next((e for e in ("x86", "fbgemm", "onednn", "qnnpack") if e in engines), None)
    if engine is None:
        return "torch has no quantized engine"
    return nnqd.Linear, per_channel_dynamic_qconfig, engine


def _quantize_linear(module: nn.Linear, backend: tuple[type, object, str]) -> nn.Module:
    qlinear_cls, qconfig, engine = backend
    previous_engine = torch.backends.quantized.engine
    module.qconfig = qconfig
    try:
        torch.backends.quantized.engine = engine  # the weight is prepacked for the engine current at this point
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=r".*quantize_per_(tensor|channel).*deprecated")
            return qlinear_cls.from_float(module)
    finally:
        del module.qconfig
        torch.backends.quantized.engine = previous_engine


def quantize_draft_int8(model: nn.Module) -> int:
    """Quantize every fp32 CPU linear of a *draft* model (lm_head included) to dynamic int8, in place.

    Weights become int8 with one scale per output channel; activations are quantized to 8 bits per call (dynamic),
    and the matmul runs on fbgemm. Both `nn.Linear` and `OneDNNLinear` layers are converted. This changes the model's
    outputs (meant for drafts: the target decides every token). Embeddings, norms and tied embedding weights stay
    fp32. Returns how many layers were quantized; 0 (with a warning once) if torch cannot quantize here, and 0 for
    layers that are not fp32 on CPU.
    """

    def eligible(module: nn.Module) -> bool:
        if isinstance(module, OneDNNLinear):
            return module.bias is None or (module.bias.dtype == torch.float32 and module.bias.device.type == "cpu")
        return _is_plain_linear(module) and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu"

    if not any(eligible(m) for m in model.modules()):
        return 0
    backend = _int8_backend()
    if isinstance(backend, str):
        _warn_once("int8", f"castspec: not quantizing the draft to int8: {backend}")
        return 0

    def convert(module: nn.Module) -> nn.Module | None:
        if not eligible(module):
            return None
        if isinstance(module, OneDNNLinear):
            dense = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
            dense.weight = nn.Parameter(module.weight.detach(), requires_grad=False)
            dense.bias = module.bias
            module = dense
        return _quantize_linear(module, backend)

    return _replace_modules(model, convert)


# ---------------------------------------------------------------------------------------------------------------


def _is_int8_dynamic_linear(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Linear" and cls.__module__.startswith("torch.ao.nn.quantized.dynamic")


def describe_kernels(model: nn.Module) -> str:
    """Name the kernels `model` runs: linears "stock", "onednn-fp32", "int8-dynamic", "int8-rows", "q4k" (several
    joined by "+"), plus "+tree-attn" when its attention is `castspec.models.attention.tree_attention`, "+native"
    with native decoder layers (`castspec.models.native_layer`), else "+lean" with lean ones (`castspec.models.lean`),
    "+fused" with fused projections only."""
    from castspec.models.formats import RowInt8Linear
    from castspec.models.gguf_format import GGUFLinear

    kinds = set()
    for module in model.modules():
        if isinstance(module, GGUFLinear):
            kinds.add("q4k")
        elif isinstance(module, RowInt8Linear):
            kinds.add("int8-rows")
        elif isinstance(module, OneDNNLinear):
            kinds.add("onednn-fp32")
        elif _is_int8_dynamic_linear(module):
            kinds.add("int8-dynamic")
        elif isinstance(module, nn.Linear):
            kinds.add("stock")
    order = ["q4k", "int8-rows", "int8-dynamic", "onednn-fp32", "stock"]
    linears = "+".join(k for k in order if k in kinds) or "stock"
    from castspec.models.attention import ATTENTION_NAME
    from castspec.models.fuse import FusedPart
    from castspec.models.lean import LeanDecoderLayer
    from castspec.models.native_layer import NativeDecoderLayer

    tree_attn = getattr(getattr(model, "config", None), "_attn_implementation", None) == ATTENTION_NAME
    native = any(isinstance(m, NativeDecoderLayer) for m in model.modules())
    lean = not native and any(isinstance(m, LeanDecoderLayer) for m in model.modules())
    fused = not (lean or native) and any(isinstance(m, FusedPart) for m in model.modules())
    layers = "+native" if native else "+lean" if lean else "+fused" if fused else ""
    return linears + ("+tree-attn" if tree_attn else "") + layers
