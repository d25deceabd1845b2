"""CAST: size the draft tree from measured costs (Hong, Tan, Hu, arXiv 2510.26577, ICLR 2026).

Two modes share the cost model (`OnlineCosts`: the profiled f_T(B, c, n), f_D(B, c, n), rescaled online):

`mode=paper` follows the paper. Per level, breadth pruning keeps the largest n_i whose marginal utility per unit of
normalised draft cost passes C1 (Algorithm 1 over u_k = batch-mean cumulative top-k path scores); depth pruning goes
one level deeper only while alpha * u / c >= C2, alpha being the mean of a FIFO (size R, initialised to {1}) of
layer-to-layer utility ratios; dynamic reranking verifies the m best nodes with Algorithm 1 over the normalised
target verify cost and C3. Each mechanism can be switched off (`breadth=0`, `depth=0`, `rerank=0`) for the
ablation; switched off, it falls back to EAGLE-2's fixed `top_k` width / `max_depth` / `verify` budget. In a tree
that merges draft-free candidates (`--suffix`, `--draft none`), such a node has no draft probability: its utility
is its calibrated acceptance (below).
Defaults C1=4, C2=3, C3=2.5 are the three thresholds a third-party reading of the paper reports ("4 / 3 / 2.5");
R=4 is our choice (the paper's value was not recoverable).

`mode=auto` (default) needs no thresholds: it maximises the expected tokens per second of the whole step,
E[accepted + 1] / (draft time + verify time). A node's acceptance probability is the product, along its path, of
each edge's calibrated acceptance: the proposal's score given its parent mapped through a calibration learned
online from what the target accepted among nodes whose parent it had accepted (so evidence from shallow nodes
carries over to deeper ones). Each source of proposals has its own calibration: the draft model, the text's repeats
by match length, and tokens both proposed. A draft-free node costs no drafting time but still costs verification,
so it enters the same rate trade-off. Trees grow and are reranked by this value. Each level expands the frontier width
that maximises the predicted rate one level ahead (stopping when no width beats stopping now), and verification
takes the rate-maximising number of best nodes. When speculation stops paying (measured rate below plain
decoding's), steps fall back to plain decoding and probe again later with growing back-off.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from castspec.cost.table import OnlineCosts, monotone
from castspec.drafters.base import NUM_SOURCES, SOURCE_LM
from castspec.errors import CastspecError
from castspec.policies.base import StepContext, StepRecord, TreePolicy, on_host, register, to_device, top_nodes_by_score
from castspec.tree import DraftTree


def select_max_valid_index(utility: list[float], cost: list[float], threshold: float, start: int = 0) -> int:
    """Algorithm 1 ("select maximum valid index"): the largest k reachable by steps whose marginal utility per unit
    of cost is at least `threshold`, measured from the last accepted index (not from k-1), so a locally non-concave
    utility or a non-monotone cost curve does not stop the scan early. Index 0 is the "nothing added" point; a step
    that costs nothing (or saves) is taken whenever utility does not drop. Ratios equal to the threshold up to
    rounding count as passing (Theorem 4.1's boundary case needs >=)."""
    threshold *= 1.0 - 1e-9
    anchor = start
    for k in range(start + 1, len(utility)):
        gain, extra = utility[k] - utility[anchor], cost[k] - cost[anchor]
        if (extra <= 0 and gain >= 0) or (extra > 0 and gain / extra >= threshold):
            anchor = k
    return anchor


class Calibration:
    """Maps a proposal's log-score given its parent to the observed chance that the target accepts it (given its
    parent was accepted), separately for each source (`castspec.drafters.base.SOURCE_*`): an LM's log-probability
    and a repeat's log-frequency are different scales, and a long match is a better bet than a short one.

    Buckets over log-score with a prior pulling each bucket towards the score's own probability; kept monotone per
    source (a likelier proposal is never predicted less acceptable than a less likely one from the same source).
    Host-side bookkeeping: it takes and returns CPU tensors (the policy reaches it through `on_host`).
    """

    def __init__(self, width: float = 0.25, lowest: float = -10.0, prior_weight: float = 4.0,
                 sources: int = NUM_SOURCES):
        self.edges = torch.arange(lowest, 0.0 + 1e-9, width)  # bucket i covers (edges[i-1], edges[i]]
        centers = torch.cat([self.edges[:1] - width / 2, self.edges[1:] - width / 2])
        self.prior = centers.exp()
        self.hits = (self.prior * prior_weight).repeat(sources, 1)
        self.counts = torch.full_like(self.hits, prior_weight)
        self.table = torch.empty_like(self.hits)
        self._refresh(range(sources))

    def _refresh(self, sources) -> None:
        """Weighted isotonic fit (pool adjacent violators) per source: acceptance non-decreasing in the score."""
        for s in sources:
            self.table[s] = torch.tensor(monotone((self.hits[s] / self.counts[s]).tolist(), self.counts[s].tolist()))

    def _bucket(self, logscore: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(logscore.float().clamp(max=0.0), self.edges).clamp(max=len(self.edges) - 1)

    def __call__(self, logscore: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        index = self._bucket(logscore)
        return self.table[0][index] if source is None else self.table[source, index]

    def log(self, logscore: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        return torch.log(self(logscore, source).clamp(min=1e-6))

    def update(self, logscore: torch.Tensor, accepted: torch.Tensor, source: torch.Tensor | None = None) -> None:
        if logscore.numel() == 0:
            return
        index = self._bucket(logscore.flatten())
        source = torch.zeros_like(index) if source is None else source.flatten().long()
        size = self.hits.numel()
        cell = source * self.hits.shape[1] + index
        self.counts += torch.bincount(cell, minlength=size).float().view_as(self.counts)
        self.hits += torch.bincount(cell, weights=accepted.float().flatten(), minlength=size).view_as(self.hits)
        self._refresh(source.unique().tolist())


@dataclass
class MeasuredRate:
    """What auto mode has measured of speculating with one kind of drafter (a draft model, or draft-free), and the
    plain-decoding back-off that measure earned."""

    tokens_per_ms: float | None = None  # of speculative steps (EMA)
    backoff: int = 0  # length of the last plain stretch (doubles with each failed probe)
    plain_left: int = 0  # plain steps left in the current stretch
    probing: int = 0  # speculative steps left in a probe

    def restart(self) -> None:
        """A new batch: no back-off; probe first if a rate was measured."""
        self.backoff, self.plain_left, self.probing = 0, 0, int(self.tokens_per_ms is not None)


@register
class CastPolicy(TreePolicy):
    name = "cast"
    needs_costs = True

    def __init__(self, mode: str = "auto", C1: float = 4.0, C2: float = 3.0, C3: float = 2.5, R: int = 4,
                 top_k: int = 8, max_depth: int = 16, max_width: int = 16, verify: int = 64,
                 breadth: int = 1, depth: int = 1, rerank: int = 1):
        if mode not in ("auto", "paper"):
            raise CastspecError(f"cast: mode must be 'auto' or 'paper', got '{mode}'")
        if min(top_k, max_depth, max_width, verify, R) < 1:
            raise CastspecError("cast: top_k, max_depth, max_width, verify and R must be at least 1")
        self.mode = mode
        self.C1, self.C2, self.C3, self.R = float(C1), float(C2), float(C3), int(R)
        self.top_k, self.depth_cap, self.max_width, self.verify_cap = int(top_k), int(max_depth), int(max_width), \
            int(verify)
        self.breadth, self.depth_pruning, self.rerank = bool(breadth), bool(depth), bool(rerank)
        self.costs: OnlineCosts | None = None
        self.ratios: deque[float] = deque([1.0], maxlen=self.R)  # paper: FIFO of layer utility ratios
        self.calibration = Calibration()
        self.measured = {False: MeasuredRate(), True: MeasuredRate()}  # per kind of drafter: draft-free or not
        self.rate = self.measured[False]  # this step's kind's
        self.last_plan: dict[str, Any] = {}

    def attach_costs(self, costs: OnlineCosts) -> None:
        self.costs = costs

    # --- per step --------------------------------------------------------------------------------------------
    # Every decision below is host arithmetic on the CPU (costs, calibration, rates); the device-facing methods
    # (begin_step, choose, select, observe) reach it only through `on_host` and return indices through `to_device`.
    def begin_step(self, ctx: StepContext) -> None:
        if self.costs is None:
            raise CastspecError("the cast policy needs a cost table (load_generator profiles one automatically)")
        self.ctx = ctx
        on_host(self._plan_step)

    def _plan_step(self) -> None:
        """This step's cost lookups and fresh per-step state; decides whether it is a plain-decoding step."""
        ctx = self.ctx
        self._rate_of(ctx.draft_free)
        # Costs of this step's possible shapes, looked up once: verify m nodes (+ root), draft w tokens.
        self.verify_ms = torch.tensor(self.costs.times_ms("target", ctx.batch_size, ctx.context_len,
                                                          range(1, self.verify_cap + 2)))
        widths = range(1, max(self.max_width, self.top_k) + 1)
        self.draft_w_ms = [0.0] + ([0.0] * len(widths) if ctx.draft_free else
                                   self.costs.times_ms("draft", ctx.batch_size, ctx.context_len, widths))
        self.t_one = float(self.verify_ms[0])
        self.draft_ms = self.draft_w_ms[1]  # the catch-up forward over the pending tokens
        self.prev_u: float | None = None
        self.node_logacc: list[torch.Tensor] = []  # calibrated log-acceptance of kept nodes, per level [B, W]
        self.frontier_score = torch.zeros(ctx.batch_size, 1)  # draft path log-prob of the frontier (root: 0)
        self.frontier_logacc = torch.zeros(ctx.batch_size, 1)  # calibrated path log-acceptance of the frontier
        self.frontier_shift = torch.zeros(ctx.batch_size, 1)  # paper: its utility minus its path log-score
        self.node_utility: list[torch.Tensor] = []  # paper: log-utility of kept nodes, per level [B, W]
        self.widths: list[int] = []  # frontier nodes expanded after each level (0: the last level)
        self.plain = self._take_plain_step()
        self.last_plan = {"plain": self.plain}

    def _f(self, role: str, tokens: int) -> float:
        return self.costs.time_ms(role, self.ctx.batch_size, self.ctx.context_len, tokens)

    def _rate_of(self, draft_free: bool) -> None:
        """Switch to the measured rate and back-off of this kind of drafter. A lazy draft model joins after the free
        suffix drafter, whose slow rate on text that does not repeat would otherwise keep it decoding plainly for a
        back-off after the purchase; and the next request starts draft-free again, where the model's rate is not
        evidence either."""
        self.rate = self.measured[draft_free]

    def new_batch(self) -> None:
        """A new request speculates first and is judged by that probe: a back-off earned on the previous prompt
        (up to 64 steps) is no evidence about this one. (NQ/374 in benchmarks/lazy-fixed-q4k-8 inherited one: 81 of
        its 103 steps decoded plainly.) The costs and the calibration carry over; they are about the models."""
        for rate in self.measured.values():
            rate.restart()

    def _take_plain_step(self) -> bool:
        """auto: fall back to plain decoding while speculation measures slower than it; probe again later."""
        if self.mode != "auto":
            return False
        rate = self.rate
        if rate.plain_left > 0:
            rate.plain_left -= 1
            # The probe after a backoff speculates twice and is judged by its second step alone: the first one also
            # feeds the draft every token accepted while decoding plainly (one wide catch-up forward), a cost of
            # the plain stretch that would otherwise make every probe look slow and keep CAST from ever returning.
            rate.probing = 2 if rate.plain_left == 0 else 0
            return True
        if rate.probing:  # the backoff is over: speculate and judge by the probe, not the stale rate
            return False
        if rate.tokens_per_ms is not None and rate.tokens_per_ms < 0.95 / self.t_one:
            rate.backoff = min(max(2 * rate.backoff, 4), 64)  # each failed probe waits twice as long
            rate.plain_left = rate.backoff - 1
            return True
        if rate.tokens_per_ms is not None and rate.tokens_per_ms >= 1.0 / self.t_one:
            rate.backoff = 0
        return False

    def max_depth(self) -> int:
        return 0 if self.plain else self.depth_cap

    def children_per_node(self, level: int) -> int:
        return self.top_k

    def choose(self, level: int, cand_logscore: torch.Tensor,
               cand_source: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        source = torch.full_like(cand_logscore, SOURCE_LM, dtype=torch.long) if cand_source is None else cand_source
        kept, expand = on_host(self._choose_on_host, cand_logscore, source)
        return to_device(kept, cand_logscore.device), expand

    def _choose_on_host(self, cand_logscore: torch.Tensor, cand_source: torch.Tensor) -> tuple[torch.Tensor, int]:
        """`choose` on the host: the kept candidate indices (CPU) and the next frontier's width."""
        batch, frontier = self.frontier_score.shape
        edge_logp = cand_logscore.view(batch, frontier, -1) - self.frontier_score[:, :, None]
        edge_source = cand_source.view(batch, frontier, -1)
        edge_logacc = self.calibration.log(edge_logp, edge_source)
        cand_logacc = (self.frontier_logacc[:, :, None] + edge_logacc).flatten(1)
        # paper: a node's utility is its draft path probability, with each draft-free edge counted at its
        # calibrated acceptance instead (it has no draft probability); a pure draft-model tree adds exactly 0.
        edge_shift = torch.where(edge_source == SOURCE_LM, 0.0, edge_logacc - edge_logp)
        cand_utility = cand_logscore + (self.frontier_shift[:, :, None] + edge_shift).flatten(1)
        ranking = cand_utility if self.mode == "paper" else cand_logacc
        order = torch.sort(ranking, dim=1, descending=True, stable=True).indices
        if self.mode == "paper":
            keep, expand = self._choose_paper(cand_utility.gather(1, order))
        else:
            keep, expand = self._choose_auto(cand_logacc.gather(1, order), edge_logp, edge_logacc, edge_source)
        self.widths.append(expand)
        kept = order[:, :keep]
        self.node_logacc.append(cand_logacc.gather(1, kept))
        self.node_utility.append(cand_utility.gather(1, kept))
        self.frontier_score = cand_logscore.gather(1, kept[:, :expand])
        self.frontier_logacc = cand_logacc.gather(1, kept[:, :expand])
        self.frontier_shift = (cand_utility - cand_logscore).gather(1, kept[:, :expand])
        self.draft_ms += self.draft_w_ms[expand]
        return kept, expand

    # --- paper mode ------------------------------------------------------------------------------------------
    def _choose_paper(self, scores: torch.Tensor) -> tuple[int, int]:
        limit = min(scores.shape[1], self.max_width)
        u = [0.0] + scores[:, :limit].exp().cumsum(dim=1).mean(dim=0).tolist()
        free = self.ctx.draft_free
        c = [0.0] + [0.0 if free else self._f("draft", k) / self.t_one for k in range(1, limit + 1)]  # normalised
        width = select_max_valid_index(u, c, self.C1, start=1) if self.breadth else min(self.top_k, limit)
        go_on = True
        if self.depth_pruning:
            if self.prev_u:
                self.ratios.append(u[width] / self.prev_u)
            alpha = sum(self.ratios) / len(self.ratios)
            go_on = c[width] <= 0 or alpha * u[width] / c[width] >= self.C2  # a free level always pays
        self.prev_u = u[width]
        return width, (width if go_on else 0)

    # --- auto mode -------------------------------------------------------------------------------------------
    def _choose_auto(self, sorted_logacc: torch.Tensor, edge_logp: torch.Tensor, edge_logacc: torch.Tensor,
                     edge_source: torch.Tensor) -> tuple[int, int]:
        """Keep the best candidates (for verification); expand the width that maximises the predicted rate."""
        keep = min(sorted_logacc.shape[1], self.verify_cap)
        widths = min(keep, self.max_width)
        pool = torch.cat(self.node_logacc + [sorted_logacc[:, :keep]], dim=1).exp()
        # The next level, predicted: each expanded node's children at the ranks this level's children had (from a
        # draft model alone: the calibrated mean rank score; from mixed sources: the mean calibrated acceptance).
        if bool((edge_source == SOURCE_LM).all()):
            rank_logacc = self.calibration.log(edge_logp.mean(dim=(0, 1)))  # [k]
        else:
            rank_logacc = edge_logacc.exp().mean(dim=(0, 1)).clamp(min=1e-6).log()
        # every width at once (0: stop here): width w adds the children of the w best nodes, the rest count as 0
        children = (sorted_logacc[:, :widths, None] + rank_logacc[None, None, :]).exp()  # [B, widths, k]
        expanded = torch.arange(widths + 1)[:, None, None, None] > torch.arange(widths)[None, None, :, None]
        pools = torch.cat([pool.expand(widths + 1, -1, -1), (children[None] * expanded).flatten(2)], dim=2)
        draft_ms = torch.tensor([self.draft_ms] + [self.draft_ms + self.draft_w_ms[w] for w in range(1, widths + 1)])
        rates = self._best_rates(pools, draft_ms).tolist()
        best_rate, best_width = rates[0], 0
        for width in range(1, widths + 1):
            if rates[width] > best_rate * 1.0001:
                best_rate, best_width = rates[width], width
        return keep, best_width

    def _rates(self, accept: torch.Tensor, draft_ms: torch.Tensor) -> torch.Tensor:
        """Expected tokens per ms of several candidate pools [P, B, L] (zeros: no candidate; they never raise a
        rate), each with its drafting time [P], for every verify count m = 0 .. count: [P, count + 1]. m counts the
        best acceptances verified beside the root: (1 + their sum) / (drafting + verifying m + 1 nodes)."""
        count = min(accept.shape[2], self.verify_cap)
        utility = torch.sort(accept, dim=2, descending=True).values[:, :, :count].cumsum(dim=2).mean(dim=1)
        expected = torch.cat([torch.ones(accept.shape[0], 1), 1.0 + utility], dim=1)  # m = 0, 1, ..., count
        return expected / (draft_ms[:, None] + self.verify_ms[None, : count + 1])

    def _best_rates(self, accept: torch.Tensor, draft_ms: torch.Tensor) -> torch.Tensor:
        """The best rate of each of several candidate pools (`_rates`), [P]."""
        return self._rates(accept, draft_ms).amax(dim=1)

    def _best_rate(self, accept: torch.Tensor, draft_ms: float) -> tuple[float, int]:
        """Best expected tokens per ms of one pool [B, L] over verify counts m, and that m."""
        rate = self._rates(accept[None], torch.tensor([draft_ms]))[0]
        best_m = int(rate.argmax())
        return float(rate[best_m]), best_m

    # --- verification ----------------------------------------------------------------------------------------
    def select(self, tree: DraftTree) -> torch.Tensor:
        if self.mode == "paper":
            count, utility = on_host(self._rerank_paper)
            self.last_plan.update(widths=self.widths, verify=count)
            return top_nodes_by_score(tree, count, values=to_device(utility, tree.logscore.device))
        count, logacc = on_host(self._plan_verify)
        return top_nodes_by_score(tree, count, values=to_device(logacc, tree.logscore.device))

    def _plan_verify(self) -> tuple[int, torch.Tensor]:
        """auto, on the host: how many nodes to verify, and every node's calibrated log-acceptance (CPU) to rank by."""
        logacc = torch.cat(self.node_logacc, dim=1)  # in tree order: levels were appended as kept
        rate, count = self._best_rate(logacc.exp(), self.draft_ms)
        expected = rate * (self.draft_ms + float(self.verify_ms[min(count, self.verify_cap)])) - 1.0
        self.last_plan.update(widths=self.widths, verify=count, predicted_accepted=round(expected, 3),
                              predicted_draft_ms=round(self.draft_ms, 2),
                              predicted_verify_ms=round(float(self.verify_ms[min(count, self.verify_cap)]), 2))
        return count, logacc

    def _rerank_paper(self) -> tuple[int, torch.Tensor]:
        """paper, on the host: the verify count (Algorithm 1 over the nodes' utilities when reranking, else the cap)
        and every node's log-utility (CPU) to rank by, in tree order (levels were appended as kept)."""
        utility = torch.cat(self.node_utility, dim=1)
        limit = min(utility.shape[1], self.verify_cap)
        if not self.rerank:
            return limit, utility
        top = torch.sort(utility, dim=1, descending=True).values[:, :limit]
        u = [0.0] + top.exp().cumsum(dim=1).mean(dim=0).tolist()
        c = [1.0] + [self._f("target", k + 1) / self.t_one for k in range(1, limit + 1)]
        return select_max_valid_index(u, c, self.C3, start=0), utility

    # --- learning --------------------------------------------------------------------------------------------
    def observe(self, record: StepRecord) -> None:
        if self.costs is None:
            return
        edges: tuple[torch.Tensor, ...] = ()
        if record.edge_logp is not None and record.edge_logp.numel():
            source = record.edge_source
            source = torch.full_like(record.edge_logp, SOURCE_LM, dtype=torch.long) if source is None else source
            edges = (record.edge_logp, record.parent_accepted, record.node_accepted, source)
        on_host(partial(self._learn, record), record.accepted, *edges)

    def _learn(self, record: StepRecord, accepted: torch.Tensor, edge_logp: torch.Tensor | None = None,
               parent_accepted: torch.Tensor | None = None, node_accepted: torch.Tensor | None = None,
               edge_source: torch.Tensor | None = None) -> None:
        """`observe` on the host (CPU copies of the step's tensors): calibration, cost rescaling, measured rate."""
        if edge_logp is not None:
            judged = parent_accepted
            self.calibration.update(edge_logp[judged], node_accepted[judged], edge_source[judged])
        predicted_verify = float(self.verify_ms[min(record.verified, self.verify_cap)])
        self.costs.observe("target", predicted_verify, record.verify_s * 1000)
        measured = self.rate
        catch_up = measured.probing == 2 and not self.plain  # the probe's first step: its draft time is the catch-up's
        if record.tree_size and not self.ctx.draft_free and not catch_up:
            self.costs.observe("draft", self.draft_ms, record.draft_s * 1000)
        if catch_up:  # not a measure of speculation either
            measured.probing = 1
        elif not self.plain:  # a speculative step (even one that verified nothing) measures the speculative rate
            tokens = float(accepted.float().mean()) + 1.0
            step_rate = tokens / max((record.draft_s + record.verify_s) * 1000, 1e-6)
            fresh = measured.tokens_per_ms is None or measured.probing
            measured.tokens_per_ms = step_rate if fresh else \
                measured.tokens_per_ms + 0.2 * (step_rate - measured.tokens_per_ms)
            measured.probing = 0

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"policy": self.name, "mode": self.mode}
        if self.mode == "paper":
            out.update(C1=self.C1, C2=self.C2, C3=self.C3, R=self.R, breadth=self.breadth,
                       depth=self.depth_pruning, rerank=self.rerank)
        return out

    def plan(self) -> dict[str, Any]:
        return dict(self.last_plan)

