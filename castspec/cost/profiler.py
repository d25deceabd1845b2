"""Measure f(B, c, n) for the target and the draft on this device, exactly as the engine runs them.

Each measurement builds a real cache of c tokens for B sequences, then times one forward over n new tokens per
sequence through the same `CausalLMRunner` the decode loop uses (4D mask, explicit positions, kernels as loaded),
and drops those tokens again. One warm-up per (role, B, c), then the fastest of `repeats` runs per n.

`models` maps roles to `ModelRuntime`s (`castspec.runtime`): the profile then drives each runtime's own runner, the
very one the engine decodes with; a bare model gets a runtime made for the profile.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from castspec.cost.machine_load import cpu_times, others_busy_cores
from castspec.cost.table import CostTable
from castspec.errors import CastspecError
from castspec.models.draft_head import draft_vocab_ids, draft_vocab_size
from castspec.models.kernels import describe_kernels
from castspec.models.runner import CausalLMRunner
from castspec.runtime import ModelRuntime, runtime_of


@dataclass
class Grid:
    batch_sizes: list[int]
    contexts: list[int]
    tokens: list[int]
    repeats: int = 3
    max_batch_tokens: int = 128  # skip B x n beyond this (never worth verifying on a CPU) to keep profiling short
    cheap_repeats: int = 5  # shapes of at most `cheap_tokens` (B x n) tokens, the ones small trees use, read more
    cheap_tokens: int = 8


DEFAULT_GRID = Grid(batch_sizes=[1, 2, 4, 8], contexts=[256, 1024], tokens=[1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64])


def quick_grid(max_batch_size: int = 1) -> Grid:
    """What first use profiles automatically: one context, fewer repeats, and batch sizes 1, 2, 4, ... up to
    `max_batch_size` (a batch shrinks as its sequences finish, so every smaller size is looked up too)."""
    return Grid(batch_sizes=batch_size_grid(max_batch_size), contexts=[512], tokens=[1, 2, 4, 8, 16, 32, 64],
                repeats=2)


def batch_size_grid(max_batch_size: int) -> list[int]:
    """1, the powers of two below `max_batch_size`, and `max_batch_size` itself (lookups interpolate between)."""
    if max_batch_size < 1:
        raise CastspecError(f"batch size must be at least 1, got {max_batch_size}")
    return sorted({1, max_batch_size} | {2**i for i in range(max_batch_size.bit_length()) if 2**i < max_batch_size})


def cpu_description() -> str:
    """The CPU's model name and the vector instruction set torch dispatches to, e.g. "AMD EPYC (AVX512, bf16)".

    Hosts that report the same model name can differ in ISA (a VM may expose AVX-512 or only AVX2), and forward costs
    differ with it by ~2x: the cost table's key and the benchmark's environment both need it.
    """
    name, flags = None, set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:  # the first processor's block: model name, then flags
                if line.startswith("model name") and name is None:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    name = name or platform.processor() or "cpu"
    features = [torch.backends.cpu.get_cpu_capability()]
    features += [label for flag, label in (("avx512_bf16", "bf16"), ("avx512_vnni", "vnni"), ("amx_tile", "amx"))
                 if flag in flags]
    return f"{name} ({', '.join(features)})"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{cpu_description()}"


def model_fingerprint(model) -> dict[str, Any]:
    """Identity of a loaded model as the cost table sees it: config, parameter count, dtype and kernels."""
    config_text = model.config.to_json_string(use_diff=False)
    params = sum(p.numel() for p in model.parameters())
    digest = hashlib.sha256(f"{config_text}\0{params}".encode()).hexdigest()[:12]
    name = Path(str(getattr(model.config, "_name_or_path", "") or "model")).name
    out = {"name": name, "hash": digest, "dtype": str(model.dtype).replace("torch.", ""),
           "kernels": describe_kernels(model), "params": params}
    if draft_vocab_ids(model) is not None:  # a reduced output head (its parameter count is in the hash too)
        out["proposes"] = draft_vocab_size(model)
    if "q4k" in out["kernels"]:
        out["q4k"] = _q4k_identity(model)
    return out


def _q4k_identity(model) -> str:
    """The native kernels' build and the bytes of the model's blocks (buffers, not parameters: a head quantized to
    Q4_K instead of Q6_K changes no parameter count but what a forward reads)."""
    from castspec.models.gguf_format import GGUFLinear
    from castspec.models.native import build_key

    blocks = sum(m.blocks.numel() for m in model.modules() if isinstance(m, GGUFLinear))
    return f"{build_key()}:{blocks}"


def _model(model_or_runtime) -> Any:
    return model_or_runtime.model if isinstance(model_or_runtime, ModelRuntime) else model_or_runtime


def expected_meta(models: dict[str, Any]) -> dict[str, Any]:
    """What a cost table for these models (or runtimes) on this device must say it was measured on."""
    first = _model(next(iter(models.values())))
    return {"device": device_name(first.device), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "models": {role: model_fingerprint(_model(m)) for role, m in models.items()}}


def table_path(meta: dict[str, Any], home: Path) -> Path:
    key = "|".join([meta["device"], str(meta["threads"])] +
                   [f"{r}:{m['hash']}:{m['dtype']}:{m['kernels']}" + (f":{m['q4k']}" if "q4k" in m else "")
                    for r, m in sorted(meta["models"].items())])
    return home / "costs" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def profile(models: dict[str, Any], grid: Grid, progress: bool = True) -> CostTable:
    """Measure every role's forward times on the grid and return the table."""
    runtimes = {role: runtime_of(m, role) for role, m in models.items()}
    for role, runtime in runtimes.items():
        limit = getattr(runtime.model.config, "max_position_embeddings", None)
        if limit and max(grid.contexts) + max(grid.tokens) > limit:
            raise CastspecError(f"{role}: context grid up to {max(grid.contexts)} exceeds the model's {limit} "
                                "positions; pass smaller --contexts")
    cells = [(role, b, c) for role in models for b in grid.batch_sizes for c in grid.contexts]
    total = sum(sum(1 for n in grid.tokens if b * n <= grid.max_batch_tokens or n == 1) for _, b, _ in cells)
    bar = tqdm(total=total, desc="profiling", unit="shape", disable=not progress, file=sys.stderr)
    before = cpu_times()
    ms: dict[str, list[list[list[float | None]]]] = {
        role: [[[None] * len(grid.tokens) for _ in grid.contexts] for _ in grid.batch_sizes] for role in models}
    for role, b, c in cells:
        runner = runtimes[role].runner  # the engine's own
        _synthetic_context(runner, b, c)
        _time_forward(runner, 1)  # warm-up once per cell: first-touch allocations are not the model's cost
        times = _read_cell(runner, b, grid, lambda n, b=b, role=role, c=c: bar.set_postfix_str(
            f"{role} B={b} c={c} n={n}"), bar.update)
        for ni, readings in times.items():
            # The fastest run: on a shared machine, noise only ever adds time; the online scale tracks the level.
            ms[role][grid.batch_sizes.index(b)][grid.contexts.index(c)][ni] = round(min(readings), 3)
    bar.close()
    meta = expected_meta(models)
    meta["measured"] = time.strftime("%Y-%m-%d %H:%M:%S")
    meta["host"] = platform.node() or os.uname().nodename
    table = CostTable(meta=meta, batch_sizes=list(grid.batch_sizes), contexts=list(grid.contexts),
                      tokens=list(grid.tokens), ms=ms,
                      extra={"repeats": grid.repeats, "other_busy_cores": others_busy_cores(before, cpu_times())})
    ratios = table.draft_ratios()
    if ratios is not None:  # for reading the table: what a draft level costs against a plain decoding step
        table.extra["draft_vs_target_1"] = ratios
    return table


def _read_cell(runner: CausalLMRunner, batch: int, grid: Grid, show: Callable[[int], None],
               done: Callable[[int], None]) -> dict[int, list[float]]:
    """Readings of every token count of one (role, batch, context) cell, {grid index: ms}, taken in rounds over
    the counts, so that a busy moment of a shared machine spoils one reading of several shapes rather than every
    reading of one; cheap shapes get more rounds."""
    shapes = [(ni, n) for ni, n in enumerate(grid.tokens) if batch * n <= grid.max_batch_tokens or n == 1]
    rounds = {ni: grid.cheap_repeats if batch * n <= grid.cheap_tokens else grid.repeats for ni, n in shapes}
    times: dict[int, list[float]] = {ni: [] for ni, _ in shapes}
    for rep in range(max(rounds.values(), default=0)):
        for ni, n in shapes:
            if rep < rounds[ni]:
                show(n)
                times[ni].append(_time_forward(runner, n))
                if rep == rounds[ni] - 1:
                    done(1)
    return times


def _synthetic_context(runner: CausalLMRunner, batch: int, length: int) -> None:
    """Give the runner a `length`-token cache for `batch` sequences without paying for a long prefill."""
    runner.synthetic_context(batch, length, seed=batch * 7919 + length)


def _time_forward(runner: CausalLMRunner, n: int) -> float:
    batch = runner.batch_size
    device = runner.device
    tokens = torch.randint(3, runner.config.vocab_size, (batch, n), device=device)
    positions = runner.next_pos[:, None] + torch.arange(n, device=device)
    mask = torch.ones(n, n, dtype=torch.bool, device=device).tril()[None].expand(batch, -1, -1)
    runner.begin_block()
    _sync(device)
    start = time.perf_counter()
    # The full output head, also for a target with a greedy head: on these random tokens no column stands out, so the
    # greedy head would compute nearly all of them after its coarse pass (measured 1.7x the full head at 16 tokens),
    # while on real text it reads less than the full head; the online scale corrects the level.
    runner.forward(tokens, positions, mask)
    _sync(device)
    elapsed = (time.perf_counter() - start) * 1000
    runner.commit(torch.zeros(batch, 0, dtype=torch.long, device=device),
                  torch.zeros(batch, dtype=torch.long, device=device))
    return elapsed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Cores other processes may keep busy while a quick table is measured for it still to be cached: a table measured
# beside another computation holds that load's timings, and CAST would size every later run's trees by them.
BUSY_LIMIT = 0.25


def load_or_profile(models: dict[str, Any], path: str | Path | None = None, max_batch_size: int = 1,
                    home: Path | None = None) -> CostTable:
    """The cost table for these loaded models on this device, covering batches of 1 .. `max_batch_size`.

    An explicit `path` must exist and match. Otherwise the table cached under `$CASTSPEC_HOME/costs/` for exactly
    this device, thread count, models, dtypes and kernels is used; if there is none yet, a quick profile runs
    (about a minute per batch size, with a notice) and is cached. A cached quick table that lacks the batch sizes
    is measured again with them; a table from `castspec profile` or `path` is never overwritten: if it lacks them,
    one warning line says that lookups are clamped to its largest batch size and how to measure the rest.
    """
    from castspec.models.packaged import castspec_home

    expected = expected_meta(models)
    if path is not None:
        table = CostTable.load(Path(path))
        table.check_matches(expected)
        warn_if_uncovered(table, max_batch_size, Path(path))
        return table
    cached = table_path(expected, home or castspec_home())
    grid = quick_grid(max_batch_size)
    if cached.is_file():
        table = CostTable.load(cached)
        table.check_matches(expected)
        if covers(table, max_batch_size) or not table.extra.get("quick"):
            warn_if_uncovered(table, max_batch_size, cached)
            return table
        grid.batch_sizes = sorted(set(grid.batch_sizes) | set(table.batch_sizes))
        reason = f"the cached quick cost table lacks batch sizes up to {max_batch_size}"
    else:
        reason = "no cost table for this device and model pair yet"
    print(f"castspec: {reason}; measuring a quick one for batch sizes {_sizes(grid.batch_sizes)} (saved to "
          f"{cached}; `castspec profile` measures the full grid)", file=sys.stderr)
    table = profile(models, grid)
    table.extra["quick"] = True
    busy = measured_under_load(table)
    if busy is not None:
        print(f"castspec: warning: other processes kept {busy} cores busy while the quick cost table was measured; "
              f"it serves this run but is not saved (the next run measures again; `castspec profile` on an idle "
              f"machine writes one to keep)", file=sys.stderr)
        return table
    table.save(cached)
    return table


def measured_under_load(table: CostTable) -> float | None:
    """The cores other processes kept busy while `table` was measured, if more than `BUSY_LIMIT`; else None."""
    busy = table.extra.get("other_busy_cores")
    return busy if busy is not None and busy > BUSY_LIMIT else None


def covers(table: CostTable, max_batch_size: int) -> bool:
    """Whether lookups for every batch of 1 .. `max_batch_size` sequences fall inside the table's grid."""
    return table.batch_sizes[0] <= 1 and max_batch_size <= table.batch_sizes[-1]


def warn_if_uncovered(table: CostTable, max_batch_size: int, where: Path) -> None:
    """One loud line when cost lookups will be clamped: cast would then size trees for the wrong batch size."""
    if covers(table, max_batch_size):
        return
    wanted = sorted(set(batch_size_grid(max_batch_size)) | set(table.batch_sizes))
    print(f"castspec: warning: the cost table {where} covers batch sizes {_sizes(table.batch_sizes)} only; lookups "
          f"for batch sizes 1 to {max_batch_size} are clamped to that range (measure them with `castspec profile "
          f"--batch-sizes {','.join(map(str, wanted))}`)", file=sys.stderr)


def _sizes(values: list[int]) -> str:
    return ", ".join(map(str, values))
