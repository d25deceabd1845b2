"""One model as castspec runs it: made once, then handed to the profiler, the engine, the CLI and the bench.

A `ModelRuntime` owns a loaded model in its format (its linears already on that format's kernels), the format's
name, and the one `CausalLMRunner` (forward, KV cache) that drives it. The profiler measures this runner's
forwards and the engine decodes with the same runner, so the cost table describes exactly what the engine runs,
and a process holds one KV cache per model however many generators (the bench's methods) share it. Generators run
one at a time: each request resets the runner's cache at its prefill.

Code that has a bare model (tests, `SpeculativeGenerator(model, ...)`) gets a runtime from `runtime_of`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from castspec.models.kernels import describe_kernels
from castspec.models.runner import CausalLMRunner

__all__ = ["ModelRuntime", "runtime_of"]

ROLES = ("target", "draft")


@dataclass(eq=False)
class ModelRuntime:
    """A model, its format, and its one runner (see the module docstring)."""

    role: str  # "target" (attends canonically: exact to itself) or "draft" (only proposes)
    model: nn.Module
    format: str  # what its weights run as: "fp32", "int8", "q4k", ...
    runner: CausalLMRunner = field(repr=False)

    @classmethod
    def of(cls, model: nn.Module, role: str = "target", format: str | None = None) -> ModelRuntime:
        """A runtime around an already prepared model (its kernels applied), with a new runner."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        return cls(role, model, format or describe_kernels(model), CausalLMRunner(model, canonical=role != "draft"))

    @property
    def device(self) -> torch.device:
        return self.runner.device

    @property
    def kernels(self) -> str:
        """What the model's layers run on ("q4k-native", "onednn-fp32", ...), for reports and cost-table keys."""
        return describe_kernels(self.model)


def runtime_of(model_or_runtime: nn.Module | ModelRuntime, role: str) -> ModelRuntime:
    """The runtime given, or a new one around a bare model in `role`."""
    if isinstance(model_or_runtime, ModelRuntime):
        if model_or_runtime.role != role:
            raise ValueError(f"a {model_or_runtime.role} runtime was given as the {role}")
        return model_or_runtime
    return ModelRuntime.of(model_or_runtime, role)
