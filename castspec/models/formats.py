"""Target formats that are exact to themselves: a token's logits never depend on what else shares the forward.

Speculative decoding is lossless only relative to plain decoding *in the same format*, and only if verifying a
token inside a tree of siblings (or beside other sequences of a batch) gives exactly the logits that decoding it
alone would. fbgemm's dynamic int8 breaks that: it picks one activation scale for the whole input matrix, so a
row's result depends on its neighbours. `RowInt8Linear` restores row independence: each row is scaled to
max |x| = 1 and a sentinel row holding +1 and -1 is appended, so the matrix's range — hence fbgemm's quantization
parameters — is always exactly [-1, 1]; each output row is multiplied back by its own scale. Integer accumulation is
exact, so a row's output is bitwise the same alone or in any batch (stronger than fp32, whose blocking can change
with the row count).

Weights are int8 with one scale per output channel (one scale per whole matrix, as `quantize_dynamic` does by
default, loses far more: teacher-forced greedy agreement with the fp32 Qwen2.5-Coder-1.5B target on HumanEval
prompt + solution text was 0.950 per matrix, 0.985 per channel; SmoothQuant-style smoothing added only 0.002, so it
is not used). `smooth` (per-input-channel factors) is kept as an option for models with worse activation outliers.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RowInt8Linear", "quantize_int8_rows"]


class RowInt8Linear(nn.Module):
    """int8 weights (per output channel) x int8 activations scaled per row; rows are independent, bitwise."""

    def __init__(self, linear: nn.Module, smooth: torch.Tensor | None = None):
        super().__init__()
        weight = linear.weight.detach().float()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        if smooth is not None:
            weight = weight * smooth[None, :]
        scale = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
        qweight = torch.quantize_per_channel(weight, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
        self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        bias = getattr(linear, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("inv_smooth", None if smooth is None else (1.0 / smooth).float())
        sentinel = torch.zeros(1, self.in_features)
        sentinel[0, 0], sentinel[0, min(1, self.in_features - 1)] = 1.0, -1.0
        self.register_buffer("sentinel", sentinel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features).float()
        if self.inv_smooth is not None:
            rows = rows * self.inv_smooth
        scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)
        # reduce_range=True: 7-bit activations, so fbgemm's AVX2 int16 pair sums never saturate.
        out = torch.ops.quantized.linear_dynamic(torch.cat([rows / scale, self.sentinel]), self._packed, True)
        out = out[:-1] * scale
        if self.bias is not None:
            out = out + self.bias
        return out.view(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"smoothed={self.inv_smooth is not None}")


def _linear_weight(module: nn.Module) -> torch.Tensor | None:
    """The dense fp32 weight of a plain or oneDNN-packed linear, else None."""
    from castspec.models.kernels import OneDNNLinear

    if type(module) is nn.Linear or isinstance(module, OneDNNLinear):
        weight = module.weight
        return weight if weight.dtype == torch.float32 and weight.device.type == "cpu" else None
    return None


def quantize_int8_rows(model: nn.Module) -> int:
    """Make every fp32 CPU linear of `model` (lm_head included) a `RowInt8Linear`, in place; returns how many."""
    from castspec.models.kernels import _replace_modules

    return _replace_modules(model, lambda module: None if _linear_weight(module) is None else RowInt8Linear(module))
