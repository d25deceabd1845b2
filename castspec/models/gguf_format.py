"""The `q4k` format: a model's linears run on the GGUF's own Q4_K / Q6_K blocks, exact to itself.

The packaged models ship as Q4_K_M GGUF files; fp32 dequantizes them (6 GB read per token for the 1.5B target) and
int8 rounds them a second time (1.5 GB). `q4k` keeps the blocks as they are (~1 GB) and multiplies them with int8
activations in castspec's own kernels (`castspec/models/native/gguf_kernels.cpp`): per row and block of 256 one
activation scale, exact integer sums, and a fixed reduction order per output. So a token's logits are bitwise the
same alone or inside any tree or batch — the property speculative decoding needs to be lossless against plain
decoding in the same format. The arithmetic is the same kind as llama.cpp's (Q8_K activations), not its bits.

Weights come from the model's GGUF when there is one (the built-in models'): each HF linear is matched to its GGUF
tensor by name, its rows reordered where the GGUF's are (Llama's q/k), and layer 0's are checked against the HF
weights, which transformers dequantized from the very same blocks, so a wrong mapping is an error, never a silently
different model. A model without a GGUF is quantized here (Q4_K, lm_head Q6_K, round to nearest: coarser than
llama.cpp's quantizer; meant for tests and for models that have no GGUF).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from castspec.errors import CastspecError

__all__ = ["GGUFLinear", "quantize_q4k", "quantize_q6k", "use_gguf_linears", "QK"]

QK = 256  # weights per block (GGUF super-block)
Q4K_BYTES, Q4K_PACKED_BYTES, Q6K_BYTES = 144, 148, 210
_HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


class GGUFLinear(nn.Module):
    """y = x W^T (+ b) with W as Q4_K (repacked) or Q6_K blocks, x quantized to int8 per row and block of 256."""

    def __init__(self, blocks: torch.Tensor, qtype: str, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        if qtype not in ("Q4_K", "Q6_K"):
            raise ValueError(f"unsupported block type {qtype}")
        width = (Q4K_PACKED_BYTES if qtype == "Q4_K" else Q6K_BYTES) * (in_features // QK)
        if in_features % QK or blocks.dtype != torch.uint8 or tuple(blocks.shape) != (out_features, width):
            raise ValueError(f"{qtype} blocks of shape {tuple(blocks.shape)} do not fit a {in_features} -> "
                             f"{out_features} linear")
        from castspec.models.native import library

        self._kernels = library()
        self.qtype, self.in_features, self.out_features = qtype, in_features, out_features
        self.register_buffer("blocks", blocks.contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features).float().contiguous()
        n, k = rows.shape
        quantized = torch.empty(n, k, dtype=torch.int8)
        scales = torch.empty(n, k // QK)
        sums = torch.empty(n, k // 16, dtype=torch.int16)
        self._kernels.quantize_rows(rows.data_ptr(), n, k, quantized.data_ptr(), scales.data_ptr(), sums.data_ptr())
        out = torch.empty(n, self.out_features)
        matmul = self._kernels.q4k_matmul if self.qtype == "Q4_K" else self._kernels.q6k_matmul
        matmul(self.blocks.data_ptr(), self.out_features, k, quantized.data_ptr(), scales.data_ptr(),
               sums.data_ptr(), n, out.data_ptr())
        if self.bias is not None:
            out += self.bias
        return out.view(*lead, self.out_features).to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        """The weight as float32 (for checks): exactly what the kernel multiplies with."""
        return torch.from_numpy(dequantize(self.blocks.numpy(), self.qtype, self.in_features))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}, " \
               f"bias={self.bias is not None}"


# ---------------------------------------------------------------------------------------------- block formats

def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(*values.shape, 2)


def quantize_q4k(weight: np.ndarray) -> np.ndarray:
    """GGUF Q4_K blocks [out, in/256*144] of a float weight, round to nearest (min/max per sub-block of 32)."""
    out, k = weight.shape
    w = weight.astype(np.float32).reshape(out, k // QK, 8, 32)
    low = np.minimum(w.min(axis=-1), 0.0)
    step = (w.max(axis=-1) - low) / 15
    d = (step.max(axis=-1) / 63).astype(np.float16).astype(np.float32)
    dmin = ((-low).max(axis=-1) / 63).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(step / np.where(d > 0, d, 1)[..., None]), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(-low / np.where(dmin > 0, dmin, 1)[..., None]), 0, 63).astype(np.uint8)
    unit = d[..., None] * sc
    q = np.rint((w + (dmin[..., None] * mn)[..., None]) / np.where(unit > 0, unit, 1)[..., None])
    q = np.clip(q, 0, 15).astype(np.uint8).reshape(out, k // QK, 4, 2, 32)
    qs = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).reshape(out, k // QK, 128)
    scales = np.empty((out, k // QK, 12), np.uint8)
    scales[..., 0:4] = (sc[..., 0:4] & 63) | ((sc[..., 4:8] >> 4) << 6)
    scales[..., 4:8] = (mn[..., 0:4] & 63) | ((mn[..., 4:8] >> 4) << 6)
    scales[..., 8:12] = (sc[..., 4:8] & 15) | ((mn[..., 4:8] & 15) << 4)
    blocks = np.concatenate([_fp16_bytes(d), _fp16_bytes(dmin), scales, qs], axis=-1)
    return np.ascontiguousarray(blocks.reshape(out, -1))


def quantize_q6k(weight: np.ndarray) -> np.ndarray:
    """GGUF Q6_K blocks [out, in/256*210] of a float weight, round to nearest (one scale per 16)."""
    out, k = weight.shape
    w = weight.astype(np.float32).reshape(out, k // QK, 16, 16)
    step = np.abs(w).max(axis=-1) / 31
    d = (step.max(axis=-1) / 127).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(step / np.where(d > 0, d, 1)[..., None]), -128, 127).astype(np.int8)
    unit = d[..., None] * sc
    q = np.rint(w / np.where(unit > 0, unit, 1)[..., None])
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(out, k // QK, 2, 4, 32)
    ql = np.concatenate([(q[:, :, :, 0] & 15) | ((q[:, :, :, 2] & 15) << 4),
                         (q[:, :, :, 1] & 15) | ((q[:, :, :, 3] & 15) << 4)], axis=-1)  # [out, nb, 2, 64]
    qh = (q[:, :, :, 0] >> 4) | ((q[:, :, :, 1] >> 4) << 2) | ((q[:, :, :, 2] >> 4) << 4) | ((q[:, :, :, 3] >> 4) << 6)
    blocks = np.concatenate([ql.reshape(out, k // QK, 128), qh.reshape(out, k // QK, 64),
                             sc.view(np.uint8), _fp16_bytes(d)], axis=-1)
    return np.ascontiguousarray(blocks.reshape(out, -1))


def repack_q4k(blocks: np.ndarray) -> np.ndarray:
    """GGUF Q4_K blocks -> the kernel's layout: the 12 bytes of packed 6-bit scales and mins as 8 + 8 bytes."""
    out = blocks.shape[0]
    b = blocks.reshape(out, -1, Q4K_BYTES)
    packed = b[:, :, 4:16]
    sc = np.empty(packed.shape[:2] + (8,), np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4], mn[..., :4] = packed[..., 0:4] & 63, packed[..., 4:8] & 63
    sc[..., 4:] = (packed[..., 8:12] & 15) | ((packed[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (packed[..., 8:12] >> 4) | ((packed[..., 4:8] >> 6) << 4)
    return np.ascontiguousarray(np.concatenate([b[:, :, 0:4], sc, mn, b[:, :, 16:]], axis=-1).reshape(out, -1))


def dequantize(blocks: np.ndarray, qtype: str, in_features: int) -> np.ndarray:
    """float32 weights of kernel-layout blocks (repacked Q4_K, or Q6_K)."""
    out = blocks.shape[0]
    if qtype == "Q4_K":
        b = blocks.reshape(out, -1, Q4K_PACKED_BYTES)
        d = b[..., 0:2].copy().view(np.float16).astype(np.float32)
        dmin = b[..., 2:4].copy().view(np.float16).astype(np.float32)
        sc, mn = b[..., 4:12].astype(np.float32), b[..., 12:20].astype(np.float32)
        qs = b[..., 20:].reshape(out, -1, 4, 1, 32)
        q = ((qs >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)) & 15).reshape(out, -1, 8, 32)
        w = (d * sc)[..., None] * q.astype(np.float32) - (dmin * mn)[..., None]
        return w.reshape(out, in_features)
    import gguf

    return gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q6_K).reshape(out, in_features)


# ---------------------------------------------------------------------------------------------- model surgery

def _linear_slots(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every linear the format replaces: decoder projections and lm_head."""
    from castspec.models.kernels import OneDNNLinear

    return [(name, module) for name, module in model.named_modules()
            if (type(module) is nn.Linear or isinstance(module, OneDNNLinear)) and module.weight.device.type == "cpu"]


def _gguf_name(hf_name: str) -> str | None:
    if hf_name == "lm_head":
        return "output.weight"
    found = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if found and found.group(2) in _HF_TO_GGUF:
        return f"blk.{found.group(1)}.{_HF_TO_GGUF[found.group(2)]}.weight"
    return None


def _llama_row_order(rows: int, heads: int) -> np.ndarray:
    """Row i of the HF weight is row order[i] of the GGUF's (llama.cpp stores Llama's q/k rotary halves
    interleaved)."""
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)


def _row_order(model: nn.Module, arch: str, hf_name: str, rows: int) -> np.ndarray | None:
    if arch != "llama" or not hf_name.endswith(("q_proj", "k_proj")):
        return None
    config = model.config
    heads = config.num_attention_heads if hf_name.endswith("q_proj") else config.num_key_value_heads
    return _llama_row_order(rows, heads)


def _blocks_from_gguf(tensor, order: np.ndarray | None) -> tuple[np.ndarray, str]:
    qtype = tensor.tensor_type.name
    if qtype not in ("Q4_K", "Q6_K"):
        raise CastspecError(f"--target-dtype q4k runs Q4_K and Q6_K blocks; the GGUF's {tensor.name} is {qtype}")
    data = np.asarray(tensor.data)
    if order is not None:
        data = data[order]
    return (repack_q4k(data) if qtype == "Q4_K" else np.array(data, copy=True)), qtype


def _check_same_weight(name: str, module: nn.Module, blocks: np.ndarray, qtype: str, rows: int = 256) -> None:
    """The GGUF blocks must dequantize to the HF weight (which transformers made from them): a mapping check."""
    weight = module.weight.detach()
    got = dequantize(blocks[:rows], qtype, weight.shape[1])
    want = weight[:rows].float().numpy()
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-5, atol=1e-6):
        raise CastspecError(f"q4k: the GGUF's blocks for {name} are not the model's weights (a different file, or a "
                            f"layout castspec does not know); use --target-dtype fp32 or int8")


def use_gguf_linears(model: nn.Module, gguf_path: str | Path | None = None) -> int:
    """Make every CPU linear of `model` a `GGUFLinear`, in place; returns how many.

    With `gguf_path`, weights are the file's blocks (rows reordered where llama.cpp stores them differently; the
    first layer's are checked against the HF weights); without, they are quantized here (Q4_K, lm_head Q6_K).
    """
    from castspec.models.kernels import _replace_modules
    from castspec.models.native import library

    library()  # fail early, in one line, where the kernels cannot run
    slots = _linear_slots(model)
    bad = [name for name, module in slots if module.weight.shape[1] % QK]
    if bad:
        raise CastspecError(f"--target-dtype q4k needs linears whose input size is a multiple of {QK}; "
                            f"{bad[0]} does not")
    reader = None
    if gguf_path is not None:
        import gguf

        reader = gguf.GGUFReader(str(gguf_path))
        tensors = {t.name: t for t in reader.tensors}
        arch = str(reader.fields["general.architecture"].contents()) if "general.architecture" in reader.fields \
            else ""
    replacements: dict[int, GGUFLinear] = {}
    for name, module in slots:
        weight = module.weight.detach()
        bias = getattr(module, "bias", None)
        if reader is None:
            qtype = "Q6_K" if name == "lm_head" else "Q4_K"
            raw = weight.float().numpy()
            blocks = quantize_q6k(raw) if qtype == "Q6_K" else repack_q4k(quantize_q4k(raw))
        else:
            key = _gguf_name(name)
            if key == "output.weight" and key not in tensors:
                key = "token_embd.weight"  # tied embeddings
            if key is None or key not in tensors:
                raise CastspecError(f"q4k: the GGUF has no tensor for {name}")
            blocks, qtype = _blocks_from_gguf(tensors[key], _row_order(model, arch, name, weight.shape[0]))
            if re.fullmatch(r"model\.layers\.0\..+|lm_head", name):
                _check_same_weight(name, module, blocks, qtype)
        replacements[id(module)] = GGUFLinear(torch.from_numpy(blocks), qtype, weight.shape[1], weight.shape[0],
                                              None if bias is None else bias.detach())
    del slots
    return _replace_modules(model, lambda module: replacements.pop(id(module), None))
