"""Fewer, larger linears: the projections a layer applies to the same input run as one matmul.

A decoder layer of a stock Hugging Face model multiplies its normalised input by q_proj, k_proj and v_proj, and the
MLP's input by gate_proj and up_proj: five calls, each with its own fixed cost (for torch's dynamic int8 linear:
dispatch, measuring and quantizing the activation, packing it for fbgemm) on top of the weight streaming. For a small
draft at one to a few tokens per forward that fixed cost is a large share of the time. `fuse_projections(model)`
concatenates each group's weights into one linear; the first member called computes all of the group's outputs and
each member returns its slice — the modeling code is untouched and still calls `self.k_proj(hidden_states)`.

A member called with another tensor than the one the group last computed, or called twice before its siblings,
computes the whole group again, so results stay right for any call pattern; only the ordinary one is fast. (Inference
tensors carry no version counter, so a tensor changed in place between two members' calls is not detected; stock
modeling code never does that between sibling projections.) Exactness:
the weight rows and biases are the same; with per-output-channel int8 weights (`quantize_draft_int8`) every row
keeps its own scale and a dynamic activation scale depends on the input only, so a fused projection equals the
separate one (tested; with float kernels it equals it up to the blocking of the matmul).

Apply before the kernel transforms (`quantize_draft_int8`, `use_fast_cpu_linears`): they convert the fused linear
like any other. Meant for drafts; on a target, equality to the unfused model is not guaranteed by every kernel.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FusedPart", "GROUPS", "fuse_projections", "is_fused"]

# Sibling projections of the same input, by child name: attention's q/k/v, a gated MLP's gate/up.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Group:
    """The shared state of one fused group (a plain object: the fused linear is registered once, in part 0)."""

    def __init__(self, sizes: list[int]):
        self.sizes = sizes
        self.owner: FusedPart | None = None
        self.input: torch.Tensor | None = None
        self.outputs: tuple[torch.Tensor, ...] = ()
        self.unread: set[int] = set()

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if not (self.input is x and index in self.unread):
            self.outputs = self.owner.fused(x).split(self.sizes, dim=-1)
            self.input = x
            self.unread = set(range(len(self.sizes)))
        self.unread.discard(index)
        out = self.outputs[index]
        if not self.unread:  # every member has its slice: hold nothing between calls
            self.input, self.outputs = None, ()
        return out


class FusedPart(nn.Module):
    """One member of a fused group: returns its slice of the group's single matmul."""

    def __init__(self, group: _Group, index: int, in_features: int, out_features: int,
                 fused: nn.Module | None = None):
        super().__init__()
        self.in_features, self.out_features, self.index = in_features, out_features, index
        self._group = group
        if fused is not None:
            self.fused = fused  # registered here only, so model.modules() sees it once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._group.output(self.index, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, part={self.index} of "
                f"{len(self._group.sizes)}")


def _float_weight(module: nn.Module) -> torch.Tensor | None:
    from castspec.models.kernels import OneDNNLinear

    if type(module) is nn.Linear or isinstance(module, OneDNNLinear):
        weight = module.weight
        return weight if weight.is_floating_point() else None
    return None


def fuse_projections(model: nn.Module) -> int:
    """Fuse every group of `GROUPS` found among a module's children (float `nn.Linear`s of the same input size,
    dtype and device), in place; returns how many groups were fused."""
    count = 0
    for parent in list(model.modules()):
        for names in GROUPS:
            members = [getattr(parent, name, None) for name in names]
            weights = [_float_weight(m) if m is not None else None for m in members]
            if any(w is None for w in weights):
                continue
            first = weights[0]
            if any(w.shape[1] != first.shape[1] or w.dtype != first.dtype or w.device != first.device
                   for w in weights):
                continue
            biases = [getattr(m, "bias", None) for m in members]
            sizes = [w.shape[0] for w in weights]
            fused = nn.Linear(first.shape[1], sum(sizes), bias=any(b is not None for b in biases),
                              device=first.device, dtype=first.dtype)
            with torch.no_grad():
                fused.weight.copy_(torch.cat([w.detach() for w in weights]))
                if fused.bias is not None:
                    fused.bias.copy_(torch.cat([b.detach() if b is not None else first.new_zeros(size)
                                                for b, size in zip(biases, sizes, strict=True)]))
            fused.train(members[0].training)
            group = _Group(sizes)
            for index, (name, size) in enumerate(zip(names, sizes, strict=True)):
                part = FusedPart(group, index, first.shape[1], size, fused if index == 0 else None)
                if index == 0:
                    group.owner = part
                setattr(parent, name, part)
            count += 1
    return count


def is_fused(model: nn.Module) -> bool:
    return any(isinstance(m, FusedPart) for m in model.modules())
