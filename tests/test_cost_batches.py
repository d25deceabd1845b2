"""Cost tables must cover the batch sizes generation will use, or say loudly that lookups are clamped."""

from __future__ import annotations

import pytest

from castspec.cost import profiler
from castspec.cost.profiler import Grid, expected_meta, load_or_profile, table_path
from castspec.cost.table import CostTable
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def models():
    return {"target": tiny_model("qwen2", seed=0).float(), "draft": tiny_model("qwen2", seed=1, layers=1).float()}


@pytest.fixture
def measured(monkeypatch):
    """Replace the profiler (slow) by a flat table on the requested grid; returns the grids it was asked for."""
    grids: list[Grid] = []

    def fake_profile(models, grid, progress=True):
        grids.append(grid)
        return flat_table(models, grid.batch_sizes)

    monkeypatch.setattr(profiler, "profile", fake_profile)
    return grids


def flat_table(models, batch_sizes: list[int], **extra) -> CostTable:
    ms = {role: [[[1.0, 2.0]] for _ in batch_sizes] for role in models}
    return CostTable(meta=expected_meta(models), batch_sizes=list(batch_sizes), contexts=[512], tokens=[1, 2],
                     ms=ms, extra=dict(extra))


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("castspec: warning:")]


def test_fresh_machine_profiles_batch_sizes_up_to_the_largest(models, measured, tmp_path, capsys):
    table = load_or_profile(models, max_batch_size=6, home=tmp_path)
    assert [g.batch_sizes for g in measured] == [[1, 2, 4, 6]]
    assert table.batch_sizes == [1, 2, 4, 6] and table.extra["quick"] is True
    assert "measuring a quick one for batch sizes 1, 2, 4, 6" in capsys.readouterr().err


def test_explicit_table_that_lacks_the_batch_size_warns_once(models, measured, tmp_path, capsys):
    path = tmp_path / "costs.json"
    flat_table(models, [1]).save(path)
    table = load_or_profile(models, path=path, max_batch_size=4)
    (line,) = warnings_in(capsys.readouterr().err)
    assert table.batch_sizes == [1] and measured == []  # used as it is, never re-measured
    assert "clamped" in line and "`castspec profile --batch-sizes 1,2,4`" in line and str(path) in line
    load_or_profile(models, path=path, max_batch_size=1)
    assert capsys.readouterr().err == ""  # batch 1 is covered: silent


def test_cached_full_table_is_never_overwritten_only_warned_about(models, measured, tmp_path, capsys):
    cached = table_path(expected_meta(models), tmp_path)
    flat_table(models, [1, 2]).save(cached)  # as `castspec profile --batch-sizes 1,2` writes it
    before = cached.read_text()
    table = load_or_profile(models, max_batch_size=8, home=tmp_path)
    assert table.batch_sizes == [1, 2] and measured == [] and cached.read_text() == before
    assert len(warnings_in(capsys.readouterr().err)) == 1


def test_cached_quick_table_is_measured_again_with_the_missing_sizes(models, measured, tmp_path, capsys):
    cached = table_path(expected_meta(models), tmp_path)
    flat_table(models, [1], quick=True).save(cached)
    table = load_or_profile(models, max_batch_size=3, home=tmp_path)
    assert [g.batch_sizes for g in measured] == [[1, 2, 3]]
    assert CostTable.load(cached).batch_sizes == table.batch_sizes == [1, 2, 3]
    assert warnings_in(capsys.readouterr().err) == []
    load_or_profile(models, max_batch_size=2, home=tmp_path)  # now covered: read from the cache
    assert len(measured) == 1


def test_a_cell_is_read_in_rounds_and_cheap_shapes_more_often(monkeypatch):
    """A busy moment spoils one reading of several shapes, not every reading of one: shapes take turns; shapes of
    at most `cheap_tokens` tokens (what small trees verify) are read `cheap_repeats` times, the rest `repeats`."""
    order = []
    monkeypatch.setattr(profiler, "_time_forward", lambda runner, n: order.append(n) or float(len(order)))
    grid = Grid(batch_sizes=[2], contexts=[64], tokens=[1, 4, 16, 128], repeats=2, max_batch_tokens=64,
                cheap_repeats=3, cheap_tokens=8)
    finished = []
    times = profiler._read_cell(None, 2, grid, lambda n: None, finished.append)
    assert order == [1, 4, 16, 1, 4, 16, 1, 4]  # B x n = 256 is skipped; 2 x 16 = 32 > 8 tokens: two rounds only
    assert {ni: len(t) for ni, t in times.items()} == {0: 3, 1: 3, 2: 2} and len(finished) == 3


def test_a_quick_table_measured_beside_another_computation_serves_the_run_but_is_not_cached(models, monkeypatch,
                                                                                           tmp_path, capsys):
    """Its times hold the other process's load; cached, they would size every later run's trees."""
    def busy_profile(models, grid, progress=True):
        return flat_table(models, grid.batch_sizes, other_busy_cores=1.2)

    monkeypatch.setattr(profiler, "profile", busy_profile)
    table = load_or_profile(models, home=tmp_path)
    (line,) = warnings_in(capsys.readouterr().err)
    assert table.batch_sizes == [1] and "1.2 cores busy" in line and "not saved" in line
    assert not table_path(expected_meta(models), tmp_path).exists()
    monkeypatch.setattr(profiler, "profile", lambda models, grid, progress=True: flat_table(
        models, grid.batch_sizes, other_busy_cores=0.0))
    load_or_profile(models, home=tmp_path)  # measured again, on an idle machine this time: kept
    assert table_path(expected_meta(models), tmp_path).exists() and warnings_in(capsys.readouterr().err) == []


def test_other_processes_busy_time_is_the_machines_minus_this_processs():
    from castspec.cost.machine_load import cpu_times, others_busy_cores

    # 200 ticks over 2 CPUs: 150 busy, 50 of them this process's -> others kept 100 / 200 * 2 = 1 core busy
    assert others_busy_cores((1000, 500, 100), (1200, 550, 150), cpus=2) == 1.0
    assert others_busy_cores((1000, 500, 100), (1200, 550, 250), cpus=2) == 0.0  # never below zero
    assert others_busy_cores(None, (1200, 550, 150)) is None
    now = cpu_times()
    assert now is None or all(isinstance(v, int) and v >= 0 for v in now)
