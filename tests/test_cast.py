"""CAST: Algorithm 1, Theorem 4.1, cost-table lookups, the profiler, and how `auto` sizes trees from costs."""

from __future__ import annotations

import json

import pytest
import torch

from castspec.cost.profiler import Grid, load_or_profile, profile
from castspec.cost.table import CostTable, OnlineCosts
from castspec.errors import CastspecError
from castspec.policies import StepContext, StepRecord, make_policy
from castspec.policies.cast import Calibration, select_max_valid_index
from tests.conftest import tiny_model

TOKENS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]


def synthetic_table(target_ms, draft_ms, batch_sizes=(1,), contexts=(128, 1024)) -> CostTable:
    """A table whose costs are given functions of (batch, tokens)."""
    def cube(fn):
        return [[[float(fn(b, n)) for n in TOKENS] for _ in contexts] for b in batch_sizes]
    return CostTable(meta={"device": "test", "threads": 1, "models": {}}, batch_sizes=list(batch_sizes),
                     contexts=list(contexts), tokens=TOKENS, ms={"target": cube(target_ms), "draft": cube(draft_ms)})


FLAT = synthetic_table(lambda b, n: 100.0 + 0.2 * n * b, lambda b, n: 10.0 + 0.05 * n * b)  # GPU-like
STEEP = synthetic_table(lambda b, n: 100.0 * (1 + 0.5 * (n * b - 1)), lambda b, n: 10.0 + 0.05 * n)  # 2-core CPU


# --- Algorithm 1 ----------------------------------------------------------------------------------------------
def test_algorithm1_concave_utility_stops_at_threshold():
    u = [0.0, 0.9, 1.5, 1.8, 1.9, 1.95]
    c = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]  # marginal ratios 9, 6, 3, 1, 0.5
    assert select_max_valid_index(u, c, 4.0) == 2
    assert select_max_valid_index(u, c, 2.0) == 3
    assert select_max_valid_index(u, c, 100.0) == 0


def test_algorithm1_tolerates_non_concave_utility():
    # k=2 adds little, k=3 a lot: measured from the last accepted index, k=3 is still reached.
    u = [0.0, 1.0, 1.05, 2.0]
    c = [0.0, 0.1, 0.2, 0.3]
    assert select_max_valid_index(u, c, 4.0) == 3


def test_algorithm1_non_monotone_cost_takes_free_steps():
    # Verifying 4 is cheaper than 3 (tile effects): the scan steps over 3 and takes 4.
    u = [0.0, 0.5, 0.8, 1.0, 1.1]
    c = [1.0, 1.1, 1.2, 1.6, 1.3]
    assert select_max_valid_index(u, c, 2.5) == 4


def test_theorem_4_1_linear_cost_reduces_to_eagle_top_k():
    """With c_k = lambda k + delta and C1 = sum_j v_j(K) / (B lambda), breadth pruning keeps exactly the top K."""
    torch.manual_seed(0)
    batch, candidates, lam, delta = 4, 30, 0.02, 0.3
    values = torch.sort(torch.rand(batch, candidates, dtype=torch.float64) ** 3, dim=1, descending=True).values
    utility = [0.0] + values.cumsum(dim=1).mean(dim=0).tolist()
    cost = [delta] + [lam * k + delta for k in range(1, candidates + 1)]
    for top_k in (1, 4, 10, 20):
        threshold = float(values[:, top_k - 1].sum()) / (batch * lam)
        assert select_max_valid_index(utility, cost, threshold) == top_k


# --- cost table ------------------------------------------------------------------------------------------------
def test_select_rounds_context_up_and_caps():
    table = synthetic_table(lambda b, n: 1.0, lambda b, n: 1.0, contexts=(128, 256, 512))
    assert [table.contexts[table.select_context(c)] for c in (1, 128, 129, 300, 512, 5000)] == \
        [128, 128, 256, 512, 512, 512]


def test_lookup_interpolates_in_tokens_and_batch():
    table = synthetic_table(lambda b, n: 10.0 * n + 100.0 * b, lambda b, n: 1.0, batch_sizes=(1, 4))
    assert table.time_ms("target", 1, 100, 5) == pytest.approx(150.0)  # between n=4 and n=6
    assert table.time_ms("target", 2, 100, 1) == pytest.approx(210.0)  # between B=1 and B=4
    assert table.time_ms("target", 1, 100, 80) == pytest.approx(10.0 * 80 + 100.0)  # extrapolated
    assert table.time_ms("target", 16, 100, 1) == pytest.approx(410.0)  # clamped to the largest B


def test_table_round_trip_and_corruption(tmp_path):
    path = tmp_path / "t.json"
    FLAT.save(path)
    assert CostTable.load(path).time_ms("draft", 1, 200, 8) == FLAT.time_ms("draft", 1, 200, 8)
    path.write_text("{not json")
    with pytest.raises(CastspecError, match="not valid JSON"):
        CostTable.load(path)
    data = FLAT.to_json()
    data["ms"]["target"][0][0] = [1.0]  # wrong shape
    path.write_text(json.dumps(data))
    with pytest.raises(CastspecError, match="corrupt"):
        CostTable.load(path)
    data = FLAT.to_json()
    data["ms"]["target"][0][0][0] = -3
    path.write_text(json.dumps(data))
    with pytest.raises(CastspecError, match="corrupt"):
        CostTable.load(path)


def test_table_for_another_device_or_model_is_refused():
    table = synthetic_table(lambda b, n: 1.0, lambda b, n: 1.0)
    table.meta = {"device": "cpu:A", "threads": 2, "models": {"target": {"hash": "x", "dtype": "float32",
                                                                          "kernels": "stock"}}}
    with pytest.raises(CastspecError, match="device"):
        table.check_matches({"device": "cpu:B", "threads": 2, "models": {}})
    with pytest.raises(CastspecError, match="target"):
        table.check_matches({"device": "cpu:A", "threads": 2,
                             "models": {"target": {"hash": "y", "dtype": "float32", "kernels": "stock"}}})


def test_online_costs_follow_measurements():
    costs = OnlineCosts(FLAT, smoothing=0.5)
    predicted = costs.time_ms("target", 1, 100, 1)
    for _ in range(20):
        costs.observe("target", costs.time_ms("target", 1, 100, 1), 2 * predicted)
    assert costs.time_ms("target", 1, 100, 1) == pytest.approx(2 * predicted, rel=0.01)


# --- profiler --------------------------------------------------------------------------------------------------
def test_profiler_on_tiny_models_makes_a_well_formed_table(tmp_path, monkeypatch):
    from castspec.cost import profiler

    monkeypatch.setattr(profiler, "BUSY_LIMIT", float("inf"))  # cached even if the machine is busy meanwhile
    models = {"target": tiny_model("qwen2", seed=0).float(), "draft": tiny_model("qwen2", seed=1, layers=1).float()}
    grid = Grid(batch_sizes=[1, 2], contexts=[16, 32], tokens=[1, 2, 4], repeats=1)
    table = profile(models, grid, progress=False)
    table.save(tmp_path / "t.json")
    loaded = CostTable.load(tmp_path / "t.json")
    assert loaded.meta["models"]["target"]["hash"] != loaded.meta["models"]["draft"]["hash"]
    assert all(t > 0 for role in ("target", "draft") for plane in loaded.ms[role] for row in plane for t in row)
    assert loaded.extra["other_busy_cores"] >= 0  # the rest of the machine's load while it was measured
    # First use without a table profiles quickly and caches; the second use reads the cache.
    first = load_or_profile(models, home=tmp_path)
    second = load_or_profile(models, home=tmp_path)
    assert first.to_json() == second.to_json()


# --- auto sizing -----------------------------------------------------------------------------------------------
def plan_tree(table: CostTable, batch: int = 1, levels: int = 6, top_k: int = 8) -> tuple[int, int]:
    """Drive the auto policy on a synthetic confident draft; returns (depth reached, nodes verified)."""
    policy = make_policy("cast")
    policy.attach_costs(OnlineCosts(table))
    policy.begin_step(StepContext(batch_size=batch, context_len=200, remaining=100))
    child_logp = torch.log(torch.tensor([0.8, 0.1, 0.04, 0.02, 0.01, 0.01, 0.01, 0.01]))[:top_k]
    frontier = torch.zeros(batch, 1)
    from castspec.tree import DraftTree
    tree = DraftTree.empty(torch.zeros(batch, dtype=torch.long))
    parents = torch.full((batch, 1), -1)
    depth = 0
    for level in range(1, levels + 1):
        cand = (frontier[:, :, None] + child_logp[None, None, :]).flatten(1)
        keep, expand = policy.choose(level, cand)
        parent_idx = parents.gather(1, keep // top_k)
        new = tree.add_level(torch.zeros_like(keep), parent_idx, cand.gather(1, keep))
        depth = level
        if expand == 0:
            break
        frontier, parents = cand.gather(1, keep[:, :expand]), new[:, :expand]
    verified = policy.select(tree).shape[1]
    return depth, verified


def test_auto_picks_small_tree_when_verify_is_steep_and_large_when_flat():
    steep_depth, steep_verify = plan_tree(STEEP)
    flat_depth, flat_verify = plan_tree(FLAT)
    assert steep_verify < flat_verify
    assert steep_verify <= 6
    assert flat_verify >= 12
    assert flat_depth >= steep_depth


def test_auto_tree_shrinks_as_batch_grows():
    table = synthetic_table(lambda b, n: 100.0 + 6.0 * n * b, lambda b, n: 10.0 + 0.5 * n * b,
                            batch_sizes=(1, 2, 4, 8, 16))
    sizes = [plan_tree(table, batch=b)[1] for b in (1, 4, 16)]
    assert sizes[0] > sizes[1] > sizes[2]


def test_auto_falls_back_to_plain_decoding_and_probes_again():
    """When speculative steps measure slower than plain decoding, auto decodes plainly, but probes again after a
    doubling backoff; a fast probe brings speculation back. A probe is two speculative steps judged by the second:
    the first also feeds the draft every token of the plain stretch (a wide catch-up forward), so it is slow however
    good speculation is. (A stale rate once blocked every probe, so one slow cold step kept a whole prompt on plain
    decoding; then the catch-up cost did the same: 125 plain steps in a row on HumanEval.)"""
    policy = make_policy("cast")
    policy.attach_costs(OnlineCosts(FLAT))
    ctx = StepContext(batch_size=1, context_len=200, remaining=100)
    first_of_probe = []

    def step(fast: bool) -> str:
        policy.begin_step(ctx)
        plain = policy.max_depth() == 0
        one_s, four_s = policy.t_one / 1000, float(policy.verify_ms[4]) / 1000
        catch_up = policy.rate.probing == 2 and not plain
        first_of_probe.append(catch_up)
        if plain:
            record = StepRecord(tree_size=0, verified=0, depth=0, accepted=torch.tensor([0]), draft_s=0.0,
                                verify_s=one_s, plan={})
        else:  # four nodes verified; fast: 3 accepted for little draft time, slow: none accepted after a long draft
            draft_s = 5.0 * one_s if catch_up or not fast else 0.1 * one_s
            record = StepRecord(tree_size=4, verified=4, depth=4, accepted=torch.tensor([3 if fast else 0]),
                                draft_s=draft_s, verify_s=four_s, plan={})
        policy.observe(record)
        return "P" if plain else "S"

    slow = "".join(step(fast=False) for _ in range(18))
    assert slow == "S" + "P" * 4 + "SS" + "P" * 8 + "SS" + "P"  # back off 4 steps, then 8, then 16
    fast = "".join(step(fast=True) for _ in range(20))
    assert fast == "P" * 15 + "S" * 5  # the probe's slow catch-up step is not held against it: speculate again
    assert first_of_probe.count(True) == 3


def step_as_measured(policy, draft_free: bool, accepted: int) -> str:
    """One step of `policy` whose speculative steps verify 4 nodes in 1.5x a plain step's time (slow unless some
    are accepted) and accept `accepted` of them; "P" if it decoded plainly, else "S"."""
    policy.begin_step(StepContext(batch_size=1, context_len=200, remaining=100, draft_free=draft_free))
    plain = policy.max_depth() == 0
    verified = 0 if plain else 4
    policy.observe(StepRecord(tree_size=verified, verified=verified, depth=min(verified, 1),
                              accepted=torch.tensor([0 if plain else accepted]), draft_s=0.0,
                              verify_s=(1.0 if plain else 1.5) * policy.t_one / 1000, plan={}))
    return "P" if plain else "S"


def test_the_measured_rate_and_back_off_belong_to_the_kind_of_drafter():
    """Slow draft-free steps (a lazy draft's suffix phase on text that does not repeat) back off to plain decoding,
    but a draft model joining then speculates at once (its own rate, none yet); back on draft-free steps (the next
    request), the back-off they earned resumes. (A lazy draft model used to inherit the suffix phase's back-off: up
    to five plain steps right after its prefill on HumanEval.)"""
    policy = make_policy("cast")
    policy.attach_costs(OnlineCosts(FLAT))

    def step(draft_free: bool, accepted: int) -> str:
        return step_as_measured(policy, draft_free, accepted)

    assert "".join(step(draft_free=True, accepted=0) for _ in range(3)) == "SPP"
    assert "".join(step(draft_free=False, accepted=3) for _ in range(3)) == "SSS"
    assert step(draft_free=True, accepted=0) == "P"  # the draft-free back-off goes on where it stopped


def test_a_new_batch_probes_instead_of_inheriting_the_back_off():
    """A request that starts while the last one's back-off still runs speculates at once, judged by that step
    alone: slow, it backs off from the first length (4) again; fast, it goes on speculating. Both kinds of drafter."""
    policy = make_policy("cast")
    policy.attach_costs(OnlineCosts(FLAT))

    def step(fast: bool, draft_free: bool = False) -> str:
        return step_as_measured(policy, draft_free, 3 if fast else 0)

    assert "".join(step(fast=False) for _ in range(8)) == "S" + "P" * 4 + "SS" + "P"  # now in an 8-step back-off
    assert "".join(step(fast=False, draft_free=True) for _ in range(2)) == "SP"
    policy.new_batch()
    assert "".join(step(fast=False) for _ in range(6)) == "S" + "P" * 4 + "S"  # probed, backed off from 4 again
    policy.new_batch()
    assert "".join(step(fast=True) for _ in range(3)) == "SSS"
    policy.new_batch()
    assert step(fast=False, draft_free=True) == "S"  # the draft-free kind's back-off was dropped too


def test_the_engine_starts_each_request_with_a_new_batch():
    from types import SimpleNamespace

    from castspec.engine import SpeculativeGenerator
    from tests.conftest import ToyTokenizer, tiny_model

    target = tiny_model("qwen2", seed=2)
    gen = SpeculativeGenerator(target, ToyTokenizer(), draft=tiny_model("qwen2", seed=5, layers=1), policy="cast",
                               costs=OnlineCosts(FLAT))
    calls = SimpleNamespace(n=0)
    gen.policy.new_batch = lambda: setattr(calls, "n", calls.n + 1)
    gen.generate([3, 4, 5], max_new_tokens=4)
    gen.generate([3, 4, 5], max_new_tokens=4)
    assert calls.n == 2


def test_calibration_learns_acceptance():
    calib = Calibration()
    scores = torch.full((1000,), -0.1)  # the draft says 90%
    calib.update(scores, torch.rand(1000) < 0.5)  # the target accepts half
    assert float(calib(torch.tensor([-0.1]))) == pytest.approx(0.5, abs=0.06)
    low, high = calib(torch.tensor([-3.0])), calib(torch.tensor([-0.01]))
    assert float(low) <= float(high)


def test_calibration_is_kept_per_source():
    """A repeat seen once (log-frequency 0) after a long match is accepted far more often than one after a short
    match, and than a draft model's equally confident token: one table per source learns each."""
    calib = Calibration()
    score = torch.zeros(400)
    calib.update(score, torch.arange(400) % 10 < 9, torch.full((400,), 4))  # long matches: 90% accepted
    calib.update(score, torch.arange(400) % 10 < 2, torch.full((400,), 1))  # one-token matches: 20%
    calib.update(score, torch.arange(400) % 10 < 6)  # no source given: the draft model's table, 60%
    at = torch.zeros(3)
    got = calib(at, torch.tensor([4, 1, 0])).tolist()
    assert got == pytest.approx([0.9, 0.2, 0.6], abs=0.03)
    untouched = float(calib(torch.zeros(1), torch.tensor([5])))
    assert untouched == pytest.approx(float(Calibration()(torch.zeros(1))))  # still its prior


def plan_mixed_tree(mode: str, suffix_acceptance: float) -> list[int]:
    """One CAST step over a level of two candidates: an LM token (log-prob -0.05) and a draft-free one (log-freq 0,
    source 4); CAST has learned that the LM's tokens at that score are accepted 50% of the time and the free ones at
    `suffix_acceptance`. Returns the sources in the order CAST ranked them."""
    policy = make_policy(f"cast:mode={mode},top_k=2")
    policy.attach_costs(OnlineCosts(FLAT))
    policy.calibration.update(torch.full((100,), -0.05), torch.arange(100) % 2 == 0)
    policy.calibration.update(torch.zeros(100), torch.arange(100) < 100 * suffix_acceptance, torch.full((100,), 4))
    policy.begin_step(StepContext(batch_size=1, context_len=200, remaining=100))
    source = torch.tensor([[0, 4]])
    keep, _ = policy.choose(1, torch.tensor([[-0.05, 0.0]]), source)
    return source.gather(1, keep)[0].tolist()


@pytest.mark.parametrize("mode", ["auto", "paper"])
def test_mixed_trees_rank_draft_free_nodes_by_their_own_calibration(mode):
    """The free candidate's raw score (log 1.0) beats the LM's; ranked by calibrated acceptance it must come second
    when repeats are rarely accepted, and first when they nearly always are (paper mode: a free node's utility is its
    calibrated acceptance; auto: every node's is)."""
    assert plan_mixed_tree(mode, suffix_acceptance=0.1)[0] == 0
    assert plan_mixed_tree(mode, suffix_acceptance=1.0)[0] == 4


def test_cost_curve_is_monotone_in_new_tokens():
    """A reading inflated by a busy moment must not make a larger tree look cheaper than a smaller one."""
    from castspec.cost.table import monotone

    assert monotone([267, 277, 298, 884, 311, 387]) == pytest.approx([267, 277, 298, 527.3333, 527.3333, 527.3333])
    assert monotone([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]


def _width_by_one_search_per_width(policy, sorted_logacc, edge_logp) -> int:
    """The auto width search rating one width at a time (the definition `_choose_auto` batches)."""
    keep = min(sorted_logacc.shape[1], policy.verify_cap)
    pool = torch.cat(policy.node_logacc + [sorted_logacc[:, :keep]], dim=1).exp()
    best_rate, best_width = policy._best_rate(pool, policy.draft_ms)[0], 0
    rank_logacc = policy.calibration.log(edge_logp.mean(dim=(0, 1)))
    for width in range(1, min(keep, policy.max_width) + 1):
        predicted = (sorted_logacc[:, :width, None] + rank_logacc[None, None, :]).flatten(1).exp()
        rate = policy._best_rate(torch.cat([pool, predicted], dim=1), policy.draft_ms + policy.draft_w_ms[width])[0]
        if rate > best_rate * 1.0001:
            best_rate, best_width = rate, width
    return best_width


def test_auto_rates_all_widths_at_once_as_it_would_one_at_a_time():
    generator = torch.Generator().manual_seed(0)
    widths = set()
    for table in (STEEP, FLAT):
        for batch in (1, 3):
            policy = make_policy("cast")
            policy.attach_costs(OnlineCosts(table))
            policy.begin_step(StepContext(batch_size=batch, context_len=200, remaining=100))
            for trial in range(6):
                logacc = (torch.rand(batch, 16, generator=generator) ** (trial + 1)).log()
                sorted_logacc = torch.sort(logacc, dim=1, descending=True).values
                edge_logp = (torch.rand(batch, 4, 4, generator=generator) ** (trial + 1)).log()
                policy.node_logacc = [torch.rand(batch, trial, generator=generator).log()]
                _, width = policy._choose_auto(sorted_logacc, edge_logp, edge_logp, torch.zeros_like(edge_logp).long())
                assert width == _width_by_one_search_per_width(policy, sorted_logacc, edge_logp)
                widths.add(width)
    assert len(widths) > 2  # the cases reach several different widths


def test_online_costs_look_a_steps_shapes_up_once_and_rescale_them_every_time():
    costs = OnlineCosts(FLAT)
    calls = []
    table_ms = costs.table_ms
    costs.table_ms = lambda *args: calls.append(args) or table_ms(*args)
    first = costs.times_ms("target", 1, 200, range(1, 9))
    assert first == [costs.time_ms("target", 1, 200, n) for n in range(1, 9)] and len(calls) == 8 + 8
    costs.observe("target", predicted_ms=first[0], measured_ms=2 * first[0])
    assert costs.times_ms("target", 1, 200, range(1, 9)) == [t * costs.scale["target"] for t in first]
    assert len(calls) == 8 + 8  # the second lookup used the cached shapes
