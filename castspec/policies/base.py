"""The interface every tree policy implements, and the registry that finds them by name.

A policy only decides shapes — how many children per node to consider, which candidates become nodes, which of
those are expanded further, and which nodes are verified. It never touches models or caches; the engine never
knows which policy it runs. Adding a policy means adding one module in this package that calls `register`.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch

from castspec.errors import CastspecError
from castspec.tree import DraftTree


@dataclass
class StepContext:
    """What a policy may know when it shapes one step's tree."""

    batch_size: int
    context_len: int  # longest sequence in the batch (tokens in the target's cache)
    remaining: int  # most tokens any sequence still wants; a tree deeper than remaining - 1 is wasted
    draft_free: bool = False  # the drafter runs no model (e.g. suffix matching): drafting costs no time


@dataclass
class StepRecord:
    """What happened in one step, for policies that learn online and for `--verbose` stats."""

    tree_size: int
    verified: int
    depth: int
    accepted: torch.Tensor  # [B] accepted draft tokens per sequence
    draft_s: float
    verify_s: float
    plan: dict[str, Any]
    edge_logp: torch.Tensor | None = None  # [B, M] draft log-prob of each verified node given its parent
    parent_accepted: torch.Tensor | None = None  # [B, M] its parent was accepted (or is the root)
    node_accepted: torch.Tensor | None = None  # [B, M] the target accepted it
    edge_source: torch.Tensor | None = None  # [B, M] who proposed it (`castspec.drafters.base.SOURCE_*`)


class TreePolicy(ABC):
    """Shapes the draft tree of each step."""

    name: ClassVar[str]
    uses_draft: ClassVar[bool] = True

    def begin_step(self, ctx: StepContext) -> None:
        self.ctx = ctx

    @abstractmethod
    def max_depth(self) -> int:
        """Deepest level this step may reach (0: no drafting, plain decoding)."""

    @abstractmethod
    def children_per_node(self, level: int) -> int:
        """How many of each frontier node's most likely children become candidates at `level` (1-based)."""

    @abstractmethod
    def choose(self, level: int, cand_logscore: torch.Tensor,
               cand_source: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """Pick the candidates [B, C] that become nodes of `level`.

        Candidate c is child rank c % k of frontier node c // k (k = children_per_node(level)); `cand_source` [B, C]
        says who proposed each (None: all the draft model). Returns the kept candidate indices [B, W] and how many
        of them, taken from the front, form the next frontier (0 stops).
        """

    def select(self, tree: DraftTree) -> torch.Tensor:
        """The nodes [B, M] to verify (closed under ancestors). Default: all of them."""
        return torch.arange(tree.size, device=tree.tokens.device).expand(tree.batch_size, tree.size)

    def observe(self, record: StepRecord) -> None:  # noqa: B027 (optional hook)
        """Called after every step; policies that adapt online override it."""

    def new_batch(self) -> None:  # noqa: B027 (optional hook)
        """Called when a batch starts from empty (a new request, or requests after the server went idle)."""

    def describe(self) -> dict[str, Any]:
        """The policy's name and settings (for results and `--json`)."""
        return {"policy": self.name}

    def plan(self) -> dict[str, Any]:
        """What the policy decided this step (widths, verify count, predictions), for `--verbose` and stats."""
        return {}


def top_nodes_by_score(tree: DraftTree, count: int, values: torch.Tensor | None = None) -> torch.Tensor:
    """The `count` best nodes per sequence by path score (or by `values` [B, N] on the tree's device, which like path
    scores must never increase from parent to child); ties go to the shallower node, so the set is always a subtree.
    Pure device work: the result is on the tree's device."""
    count = min(count, tree.size)
    values = tree.logscore if values is None else values
    by_depth = torch.sort(tree.depth, dim=1, stable=True).indices
    by_score = torch.sort(values.gather(1, by_depth), dim=1, descending=True, stable=True).indices
    return by_depth.gather(1, by_score[:, :count])


# --- The host/device boundary of policy code ----------------------------------------------------------------------
# A shape decision needs a few real numbers on the host (how many candidates to keep, how many to expand), and CAST
# keeps its bookkeeping (calibration table, costs, rates) on the CPU. These two functions are the only crossings:
# policy arithmetic that reads values runs inside `on_host`; every index a policy hands back to the engine goes
# through `to_device`. Everything else in policy code is device work on the engine's tensors.
_Host = TypeVar("_Host")


def on_host(decide: Callable[..., _Host], *values: torch.Tensor) -> _Host:
    """Run `decide` (host-side policy arithmetic) with CPU copies of the device `values` it reads.

    On a GPU each value is one small copy and one sync; a handful of host operations then beat dozens of tiny kernel
    launches. What `decide` returns is host data: ints, floats, CPU tensors (indices go back through `to_device`).
    """
    return decide(*(value.detach().cpu() for value in values))


def to_device(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host data a policy hands to the engine, moved to the tree's device (`device`, e.g. `cand_logscore.device`)."""
    return index.to(device)


_REGISTRY: dict[str, type[TreePolicy]] = {}


def register(cls: type[TreePolicy]) -> type[TreePolicy]:
    _REGISTRY[cls.name] = cls
    return cls


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


def make_policy(spec: str) -> TreePolicy:
    """Build a policy from `name` or `name:key=value,key=value` (for example `eagle2:total_tokens=16,depth=5`).

    Values are checked against the constructor's defaults (a whole number, a number or text), so a typo is a
    one-line `CastspecError` naming the parameter, never a ValueError from deep inside the policy.
    """
    name, _, args = str(spec).partition(":")
    name = name.strip()
    if name not in _REGISTRY:
        raise CastspecError(f"unknown policy '{name}': choose one of {', '.join(policy_names())}")
    cls = _REGISTRY[name]
    params = policy_parameters(cls)
    kwargs: dict[str, Any] = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise CastspecError(f"bad parameters for policy '{name}': '{item}' is not of the form key=value")
        if key not in params:
            known = f"its parameters are {', '.join(params)}" if params else "it takes no parameters"
            raise CastspecError(f"bad parameters for policy '{name}': no parameter '{key}' ({known})")
        if key in kwargs:
            raise CastspecError(f"bad parameters for policy '{name}': '{key}' is given twice")
        kwargs[key] = _parse_value(value.strip(), params[key], f"bad parameters for policy '{name}': {key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise CastspecError(f"bad parameters for policy '{name}': {err}") from None


def policy_parameters(cls: type[TreePolicy]) -> dict[str, Any]:
    """A policy's settable parameters and their defaults (`inspect.Parameter.empty` when there is none)."""
    plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    signature = inspect.signature(cls.__init__)
    return {p.name: p.default for p in list(signature.parameters.values())[1:] if p.kind in plain}


def _parse_value(text: str, default: Any, what: str) -> Any:
    """`text` as the type of the parameter's default: bool, whole number, finite number or text."""
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return text.lower() in ("1", "true", "yes", "on")
        raise CastspecError(f"{what} must be 0 or 1, got '{text}'")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise CastspecError(f"{what} must be a whole number, got '{text}'") from None
    if isinstance(default, float):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise CastspecError(f"{what} must be a number, got '{text}'")
        return value
    if isinstance(default, str):
        return text
    for convert in (int, float):  # no default to go by: the narrowest type that reads the text
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def check_children_fit(policy: TreePolicy, vocab_size: int) -> None:
    """Refuse a policy that would ask the drafter for more children of one node than the vocabulary has.

    Why here: `topk` over the draft's logits would otherwise fail mid-generation with a bare RuntimeError.
    """
    widest = widest_level(policy)
    if widest <= vocab_size:
        return
    if getattr(policy, "top_k", None) == widest:
        raise CastspecError(f"policy '{policy.name}': top_k={widest} is larger than the vocabulary "
                            f"({vocab_size} tokens); use top_k <= {vocab_size}")
    raise CastspecError(f"policy '{policy.name}' asks for child rank {widest - 1} of a node but the vocabulary has "
                        f"only {vocab_size} tokens; use ranks below {vocab_size}")


def widest_level(policy: TreePolicy, probe_levels: int = 256) -> int:
    """The most children per node the policy may ask for, over the levels it can reach (at most `probe_levels`)."""
    try:
        depth = policy.max_depth()
    except AttributeError:  # a depth decided per step (cast, before its first step): probe every level
        depth = probe_levels
    return max((policy.children_per_node(level) for level in range(1, min(depth, probe_levels) + 1)), default=0)
