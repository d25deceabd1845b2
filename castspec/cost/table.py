"""Measured forward costs f(B, c, n) of the target and the draft, stored as data and looked up fast.

A table holds, for each model role ("target", "draft"), the fastest measured time in milliseconds of one forward
over n new tokens for B sequences whose cache holds c tokens, on a grid of B, c and n. It records what it was
measured on (device, threads, torch version, model identity, dtype, kernels); a table for something else is refused.

Lookups follow the paper's `select(c)`: the context is rounded *up* to the next grid point and capped at the
largest. Between grid points of n and B the time is interpolated linearly (beyond the largest n, extrapolated from
the last two points), so policies can ask for any tree size. `OnlineCosts` rescales the table by what the running
engine actually measures, so a table from a quieter (or busier) moment of the machine still ranks trees correctly.
"""

from __future__ import annotations

import bisect
import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from castspec.errors import CastspecError

FORMAT = "castspec-cost-table/1"
ROLES = ("target", "draft")


@dataclass
class CostTable:
    meta: dict[str, Any]  # device, threads, torch, models: {role: identity + dtype + kernels}
    batch_sizes: list[int]
    contexts: list[int]
    tokens: list[int]
    ms: dict[str, list[list[list[float | None]]]]  # role -> [B][c][n] milliseconds (None: not measured)
    extra: dict[str, Any] = field(default_factory=dict)
    _curves: dict[tuple[str, int, int], tuple[list[int], list[tuple[int, float]]]] = field(
        default_factory=dict, repr=False, compare=False)

    # --- lookups ---------------------------------------------------------------------------------------------
    def select_context(self, context: int) -> int:
        """Index of the grid context used for `context`: the next one up, capped at the largest (paper's select)."""
        return min(bisect.bisect_left(self.contexts, context), len(self.contexts) - 1)

    def time_ms(self, role: str, batch: int, context: int, tokens: int) -> float:
        """Estimated time of one forward of `role` over `tokens` new tokens per sequence, for `batch` sequences."""
        if role not in self.ms:
            raise CastspecError(f"the cost table has no '{role}' measurements; re-run `castspec profile`")
        ci = self.select_context(context)
        b_lo, b_hi, b_w = _bracket(self.batch_sizes, batch)
        lo = self._curve(role, b_lo, ci, tokens)
        hi = self._curve(role, b_hi, ci, tokens) if b_hi != b_lo else lo
        return lo + b_w * (hi - lo)

    def _curve(self, role: str, bi: int, ci: int, tokens: int) -> float:
        key = (role, bi, ci)
        if key not in self._curves:
            row = self.ms[role][bi][ci]
            points = [(n, t) for n, t in zip(self.tokens, row, strict=True) if t is not None]
            if not points:
                raise CastspecError(f"the cost table has no {role} measurements for batch {self.batch_sizes[bi]}")
            ns = [n for n, _ in points]
            self._curves[key] = (ns, list(zip(ns, monotone([t for _, t in points]), strict=True)))
        ns, points = self._curves[key]
        if tokens <= ns[0]:
            return points[0][1]
        i = bisect.bisect_left(ns, tokens)
        if i == len(ns):  # beyond the grid: continue the last segment's slope
            if len(points) == 1:
                return points[0][1] * tokens / ns[0]
            (n0, t0), (n1, t1) = points[-2], points[-1]
            return t1 + (tokens - n1) * max(t1 - t0, 0.0) / (n1 - n0)
        (n0, t0), (n1, t1) = points[i - 1], points[i]
        return t0 + (tokens - n0) * (t1 - t0) / (n1 - n0)

    def draft_ratios(self) -> list[list[list[float | None]]] | None:
        """[B][c][n] draft time over n tokens / target time over 1 token at the same B and c (what one draft level
        costs in units of a plain decoding step), or None without both roles. Measured values, not the fit."""
        if "draft" not in self.ms or "target" not in self.ms:
            return None
        return [[[None if d is None or plane_t[ci][0] is None else round(d / plane_t[ci][0], 4)
                  for d in row] for ci, row in enumerate(plane_d)]
                for plane_d, plane_t in zip(self.ms["draft"], self.ms["target"], strict=True)]

    # --- storage ---------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        data = {"format": FORMAT, "meta": self.meta, "grid": {"batch_sizes": self.batch_sizes,
                "contexts": self.contexts, "tokens": self.tokens}, "ms": self.ms, "extra": self.extra}
        return copy.deepcopy(data)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> CostTable:
        try:
            data = json.loads(Path(path).read_text())
        except OSError as err:
            raise CastspecError(f"cannot read cost table {path}: {err.strerror}") from None
        except ValueError as err:
            raise CastspecError(f"cost table {path} is not valid JSON ({err}); delete it to re-profile") from None
        return cls.from_json(data, str(path))

    @classmethod
    def from_json(cls, data: Any, where: str = "cost table") -> CostTable:
        try:
            if data.get("format") != FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
            grid = data["grid"]
            table = cls(meta=dict(data["meta"]), batch_sizes=[int(b) for b in grid["batch_sizes"]],
                        contexts=[int(c) for c in grid["contexts"]], tokens=[int(n) for n in grid["tokens"]],
                        ms={role: data["ms"][role] for role in data["ms"]}, extra=dict(data.get("extra", {})))
            table._validate()
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise CastspecError(f"{where} is corrupt ({type(err).__name__}: {err}); delete it to re-profile") from None
        return table

    def _validate(self) -> None:
        for name, axis in (("batch_sizes", self.batch_sizes), ("contexts", self.contexts), ("tokens", self.tokens)):
            if not axis or axis != sorted(set(axis)) or axis[0] < 1:
                raise ValueError(f"grid axis {name} must be increasing positive integers")
        shape = (len(self.batch_sizes), len(self.contexts), len(self.tokens))
        for role, cube in self.ms.items():
            if (len(cube), len(cube[0]), len(cube[0][0])) != shape or any(
                    len(row) != shape[2] for plane in cube for row in plane) or len({len(p) for p in cube}) != 1:
                raise ValueError(f"'{role}' measurements do not match the grid {shape}")
            if any(t is not None and not (isinstance(t, int | float) and t > 0)
                   for plane in cube for row in plane for t in row):
                raise ValueError(f"'{role}' holds a time that is not a positive number")

    def check_matches(self, expected: dict[str, Any]) -> None:
        """Refuse a table measured on another device, thread count, model, dtype or kernel backend."""
        for key in ("device", "threads"):
            if self.meta.get(key) != expected.get(key):
                raise CastspecError(f"cost table was measured with {key}={self.meta.get(key)!r}, this run has "
                                    f"{expected.get(key)!r}; profile again (`castspec profile`)")
        for role, want in expected.get("models", {}).items():
            have = self.meta.get("models", {}).get(role)
            if have is None:
                raise CastspecError(f"cost table has no {role} model; profile again")
            for key in ("hash", "dtype", "kernels", "q4k"):
                if have.get(key) != want.get(key):
                    raise CastspecError(f"cost table's {role} differs ({key}: {have.get(key)!r} vs "
                                        f"{want.get(key)!r}); profile again for this model pair")


def monotone(values: list[float], weights: list[float] | None = None) -> list[float]:
    """Weighted least-squares non-decreasing fit (pool adjacent violators). For cost curves: more new tokens never
    cost less, so a reading inflated by a busy moment of the machine is averaged with its neighbours instead of
    bending the curve. Also CAST's acceptance calibration (weights = observation counts)."""
    blocks: list[list[float]] = []  # [weighted mean, total weight, number of values]
    for value, weight in zip(values, weights or [1.0] * len(values), strict=True):
        blocks.append([value, weight, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, w1, n1), (m2, w2, n2) = blocks[-2], blocks[-1]
            blocks[-2:] = [[(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2]]
    return [mean for mean, _, count in blocks for _ in range(int(count))]


def _bracket(grid: list[int], value: int) -> tuple[int, int, float]:
    """Indices of the grid points around `value` and the interpolation weight (clamped at the ends)."""
    if value <= grid[0]:
        return 0, 0, 0.0
    if value >= grid[-1]:
        return len(grid) - 1, len(grid) - 1, 0.0
    hi = bisect.bisect_left(grid, value)
    if grid[hi] == value:
        return hi, hi, 0.0
    return hi - 1, hi, (value - grid[hi - 1]) / (grid[hi] - grid[hi - 1])


class OnlineCosts:
    """Table costs rescaled by a running ratio of measured to predicted times, per role.

    The engine reports each step's measured draft and verify times with what the table predicted for them; an
    exponential average of the ratio (clamped to a sane range) scales later predictions. The table keeps the
    shape of the curve; the online ratio tracks the level.
    """

    def __init__(self, table: CostTable, smoothing: float = 0.1):
        self.table = table
        self.smoothing = smoothing
        self.scale = dict.fromkeys(ROLES, 1.0)
        self._curves: dict[tuple, list[float]] = {}  # table times by (role, batch, context index, token counts)

    def table_ms(self, role: str, batch: int, context: int, tokens: int) -> float:
        """The table's own estimate (every lookup goes through here)."""
        return self.table.time_ms(role, batch, context, tokens)

    def time_ms(self, role: str, batch: int, context: int, tokens: int) -> float:
        return self.table_ms(role, batch, context, tokens) * self.scale[role]

    def times_ms(self, role: str, batch: int, context: int, tokens: range) -> list[float]:
        """`time_ms` for several token counts at once; the table's part is looked up once per batch size and grid
        context (a policy asks for the same ~80 shapes every step)."""
        key = (role, batch, self.table.select_context(context), tokens.start, tokens.stop, tokens.step)
        if key not in self._curves:
            self._curves[key] = [self.table_ms(role, batch, context, n) for n in tokens]
        scale = self.scale[role]
        return [t * scale for t in self._curves[key]]

    def observe(self, role: str, predicted_ms: float, measured_ms: float) -> None:
        if predicted_ms <= 0 or measured_ms <= 0:
            return
        ratio = min(max(measured_ms / (predicted_ms / self.scale[role]), 0.2), 5.0)
        self.scale[role] += self.smoothing * (ratio - self.scale[role])
