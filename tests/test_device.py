"""Device placement without a GPU: every policy and the engine's drafting loop keep tensors on the tree's device.

`FakeTensorMode` runs tensor code on a fake accelerator (shapes, dtypes and devices only; no GPU needed) and raises
on any op that mixes devices, exactly where a real GPU would. Real numbers exist only on the host side of the
policy boundary (`castspec.policies.base.on_host`), which these tests stub with seeded stand-in values.

The fake device is `cuda:0` where torch can index fake CUDA tensors. A CPU-only torch 2.13 cannot: Python indexing
(`x[:, None]`) takes a CUDA device guard, which a CPU build lacks ("PyTorch is not linked with support for cuda
devices"). There the fake tensors live on `lazy:0`, which has a guard and, like `cuda:0`, is not the CPU: fake mode's
device checks behave the same (nothing in castspec branches on the device type in the code under test).

A second test reads the source of every castspec function that runs per tree level (found by tracing a real CPU
generation) and finds no host sync (`.cpu()`, `.item()`, `.tolist()`, `int(tensor)`, ...) outside that boundary.
"""

from __future__ import annotations

import ast
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

import castspec
from castspec.cost.table import OnlineCosts
from castspec.draft import DraftLM
from castspec.engine import SpeculativeGenerator, _edge_outcomes
from castspec.policies import StepContext, StepRecord, make_policy
from castspec.policies import base as policy_base
from tests.conftest import ToyTokenizer, tiny_model
from tests.test_cast import FLAT


def fake_accelerator() -> torch.device:
    """`cuda:0` if fake CUDA tensors can be indexed here, else `lazy:0` (see the module docstring). An explicit index:
    a bare "cuda" would ask the CUDA runtime for the current device."""
    for device in (torch.device("cuda", 0), torch.device("lazy", 0)):
        try:
            with FakeTensorMode():
                torch.empty(2, 2, device=device)[:, None]
            return device
        except RuntimeError:
            continue
    raise AssertionError("no device for fake tensors")


DEVICE = fake_accelerator()
VOCAB, BATCH = 50, 2
POLICIES = ["ar", "chain:gamma=3", "static", "eagle2:total_tokens=12,depth=3,top_k=3", "cast", "cast:mode=paper"]


# --- the fake-device run -----------------------------------------------------------------------------------------
class FakeDraftRunner:
    """The draft model's runner on the fake device: checks that its inputs live there, returns logits there."""

    def __init__(self):
        self.next_pos = torch.full((BATCH,), 7, dtype=torch.long, device=DEVICE)
        self.model = SimpleNamespace(config=SimpleNamespace(vocab_size=VOCAB))  # a full output head

    def prefill(self, *args, **kwargs) -> None:
        pass

    def begin_block(self) -> None:
        pass

    def forward(self, tokens, positions, block_mask, token_valid=None, **kwargs) -> torch.Tensor:
        for tensor in filter(lambda t: t is not None, (tokens, positions, block_mask, token_valid)):
            assert tensor.device == DEVICE
        return torch.randn(*tokens.shape, VOCAB, device=DEVICE)


def stand_in(value: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A real CPU tensor shaped like `value`, with plausible seeded contents (log-probs, flags or counts)."""
    if value.dtype == torch.bool:
        return torch.rand(value.shape, generator=generator) < 0.5
    if value.dtype.is_floating_point:
        return -4.0 * torch.rand(value.shape, generator=generator)
    return torch.randint(0, 3, value.shape, generator=generator)


@pytest.fixture
def host_boundary(monkeypatch):
    """Stub `on_host` wherever it is bound: device values in, seeded real CPU stand-ins to the host code, which runs
    with the fake mode off (it needs real numbers). Returns the list of calls made."""
    generator = torch.Generator().manual_seed(0)
    calls = []

    def fake_on_host(decide, *values):
        assert all(value.device == DEVICE for value in values), "policies hand the host device values"
        calls.append(decide)
        with unset_fake_temporarily():
            return decide(*(stand_in(value, generator) for value in values))

    real = policy_base.on_host
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("castspec.") and getattr(module, "on_host", None) is real:
            monkeypatch.setattr(module, "on_host", fake_on_host)
    # The selection's closure check reads values (one sync per step, in the engine); the fake run cannot.
    monkeypatch.setattr("castspec.tree.check_closed", lambda parents, parent_pos: None)
    return calls


def run_fake_steps(policy_spec: str, steps: int = 3) -> list[int]:
    """Drive `steps` steps on the fake accelerator: begin_step, the engine's level loop (children_per_node, choose,
    tree.add_level, DraftLM.expand), select, the verify block, edge outcomes and observe. Returns the tree sizes."""
    policy = make_policy(policy_spec)
    if getattr(policy, "needs_costs", False):
        policy.attach_costs(OnlineCosts(FLAT))
    sizes = []
    with FakeTensorMode(allow_non_fake_inputs=True):
        root = torch.randint(3, VOCAB, (BATCH,), device=DEVICE)
        drafter = DraftLM(FakeDraftRunner())
        engine = SimpleNamespace(policy=policy, drafter=drafter)
        for _ in range(steps):
            drafter.prefill([[5, 6, 7]] * BATCH, root)  # fresh pending tokens (commit reads values: not run here)
            ctx = StepContext(batch_size=BATCH, context_len=64, remaining=40)
            policy.begin_step(ctx)
            tree = SpeculativeGenerator._draft(engine, root, ctx)
            nodes = policy.select(tree) if tree.size else tree.tokens
            assert nodes.device == DEVICE and nodes.dtype == torch.long
            vtree = tree.select(nodes)
            tokens, positions, mask = vtree.block_inputs(drafter.runner.next_pos)
            for tensor in (tree.tokens, tree.parents, tree.depth, tree.logscore, tree.ancestors, tree.draft_slot,
                           vtree.tokens, tokens, positions, mask):
                assert tensor.device == DEVICE
            outcome = SimpleNamespace(path=torch.full((BATCH, 2), -1, dtype=torch.long, device=DEVICE),
                                      n_accepted=torch.zeros(BATCH, dtype=torch.long, device=DEVICE))
            edges = _edge_outcomes(tree, vtree, outcome)
            assert all(tensor.device == DEVICE for tensor in edges.values())
            policy.observe(StepRecord(tree_size=tree.size, verified=vtree.size, depth=0, accepted=outcome.n_accepted,
                                      draft_s=0.001, verify_s=0.01, plan=policy.plan(), **edges))
            sizes.append(tree.size)
    return sizes


@pytest.mark.parametrize("policy", POLICIES)
def test_policies_and_draft_loop_stay_on_the_device(policy, host_boundary):
    sizes = run_fake_steps(policy)
    if policy == "ar":
        assert sizes == [0, 0, 0]
    else:
        assert min(sizes) > 0  # the level loop really ran (and handed the policy's indices to gathers on the device)
    if policy.startswith("cast"):
        assert len(host_boundary) >= 3 * 3  # begin_step, choose per level, select or observe: all via the boundary


def test_fake_device_catches_host_indices(host_boundary):
    """The harness is able to fail: indices left on the CPU (the old `cast` bug) raise where a GPU would."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        scores = torch.randn(BATCH, 6, device=DEVICE)
        with pytest.raises(RuntimeError, match="device"):
            scores.gather(1, torch.zeros(BATCH, 2, dtype=torch.long))
        assert policy_base.to_device(torch.zeros(BATCH, 2, dtype=torch.long), DEVICE).device == DEVICE


# --- no host sync per tree level -----------------------------------------------------------------------------------
SYNC_METHODS = {"cpu", "item", "tolist", "numpy"}
CONVERSIONS = {"int", "float", "bool"}
PACKAGE_DIR = Path(castspec.__file__).resolve().parent


def constants(call: ast.Call) -> list:
    """The literal arguments of a call, positional and keyword."""
    return [a.value for a in [*call.args, *(k.value for k in call.keywords)] if isinstance(a, ast.Constant)]


def host_syncs(function: ast.AST) -> list[str]:
    """Calls in `function`'s own body (nested functions are judged on their own) that read a tensor's values."""
    found = []
    stack = list(ast.iter_child_nodes(function))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        stack.extend(ast.iter_child_nodes(node))
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in SYNC_METHODS:
            found.append(f".{func.attr}() at line {node.lineno}")
        elif isinstance(func, ast.Attribute) and func.attr == "to" and "cpu" in constants(node):
            found.append(f".to('cpu') at line {node.lineno}")
        elif isinstance(func, ast.Name) and func.id in CONVERSIONS and node.args and \
                not isinstance(node.args[0], ast.Constant):
            found.append(f"{func.id}(...) at line {node.lineno}")
    return found


def trace_per_level_code(policies: list[str]) -> set:
    """Code objects of castspec functions that run inside the engine's `_draft` (the per-level loop) in a real CPU
    generation, leaving out `on_host` and everything it calls: that is the one allowed host side."""
    target = tiny_model("qwen2", seed=0, sharpen=30.0).float()
    draft = tiny_model("qwen2", seed=0, sharpen=30.0).float()
    boundary = policy_base.on_host.__code__
    seen: set = set()
    inside: list = []  # the `on_host` frame while it runs

    def profiler(frame, event, arg):
        if event == "call":
            code = frame.f_code
            if code is boundary and not inside:
                inside.append(frame)
            elif not inside and Path(code.co_filename).resolve().is_relative_to(PACKAGE_DIR):
                seen.add(code)
        elif event == "return" and inside and frame is inside[0]:
            inside.clear()

    original = SpeculativeGenerator._draft

    def traced_draft(self, root, ctx):
        sys.setprofile(profiler)
        try:
            return original(self, root, ctx)
        finally:
            sys.setprofile(None)

    for spec in policies:
        gen = SpeculativeGenerator(target, ToyTokenizer(), draft=draft, policy=spec, costs=OnlineCosts(FLAT))
        SpeculativeGenerator._draft = traced_draft
        try:
            gen.generate([5, 17, 33], max_new_tokens=12)
        finally:
            SpeculativeGenerator._draft = original
    return seen


def function_nodes(code) -> list[ast.AST]:
    """The AST node(s) of a traced function (matched by file and first line, decorators included)."""
    source = Path(code.co_filename).read_text()
    tree = ast.parse(source)
    matches = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
            if first == code.co_firstlineno and (isinstance(node, ast.Lambda) or node.name == code.co_name):
                matches.append(node)
    return matches


def test_no_host_sync_per_tree_level():
    codes = trace_per_level_code(POLICIES)
    names = {code.co_qualname for code in codes}
    for expected in ("SpeculativeGenerator._draft", "DraftLM.expand", "DraftTree.add_level", "CastPolicy.choose",
                     "Eagle2Policy.choose", "StaticTreePolicy.choose", "ChainPolicy.choose"):
        assert expected in names, f"{expected} did not run per level: the trace is broken"
    problems = []
    for code in codes:
        if code.co_name.startswith("<") and code.co_name != "<lambda>":
            continue  # comprehensions are part of their enclosing function's source
        nodes = function_nodes(code)
        assert nodes, f"no source found for {code.co_qualname}"
        for node in nodes:
            where = f"{Path(code.co_filename).relative_to(PACKAGE_DIR.parent)}:{code.co_qualname}"
            problems += [f"{where}: {sync}" for sync in host_syncs(node)]
    assert not problems, "host syncs per tree level outside `on_host`:\n" + "\n".join(sorted(problems))


def test_sync_detector_flags_what_it_must():
    """The AST check can fail: each kind of host read is caught, plain shape and Python arithmetic is not."""
    source = textwrap.dedent("""
        def f(x, n):
            a = x.cpu(); b = x.max().item(); c = x.tolist(); d = int(x.sum()); e = float(x[0]); g = x.to("cpu")
            h = bool(x.any()); ok = x.shape[1] + min(n, 3) + int(4)
            return on_host(lambda y: y.tolist(), x)
    """)
    found = host_syncs(ast.parse(source).body[0])
    assert len(found) == 7, found
