"""The one decode loop: draft a tree, verify it with the target in one forward, keep the accepted path.

Every method — plain decoding (`ar`), chain, static trees, EAGLE-2, CAST — runs through `SpeculativeGenerator`;
only the policy differs. A step is:

    policy.begin_step  -> the drafter expands the tree level by level as the policy chooses
    policy.select      -> the target verifies root + selected nodes in one forward (tree mask, depth positions)
    verify_greedy      -> accepted path + bonus token; both KV caches keep exactly the accepted path
    policy.observe     -> timings and acceptance, for policies that learn online
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from castspec.cost.table import OnlineCosts
from castspec.draft import DraftLM
from castspec.errors import CastspecError
from castspec.models.runner import CausalLMRunner
from castspec.policies import StepContext, StepRecord, TreePolicy, make_policy
from castspec.tree import DraftTree
from castspec.verify import verify_greedy


@dataclass
class GenerationStats:
    steps: int = 0  # target forwards after the prefill
    accepted: list[int] = field(default_factory=list)  # accepted draft tokens per step (sequence 0)
    tree_sizes: list[int] = field(default_factory=list)
    verified: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)  # depth of the verified tree per step
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    wall_s: float = 0.0
    new_tokens: int = 0
    plans: list[dict[str, Any]] = field(default_factory=list)

    @property
    def mean_accept_len(self) -> float:
        """Tokens produced per target verification step (accepted draft tokens + the bonus token)."""
        return (sum(self.accepted) + len(self.accepted)) / max(len(self.accepted), 1)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self, per_step: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "steps": self.steps,
            "new_tokens": self.new_tokens,
            "mean_accept_len": round(self.mean_accept_len, 4),
            "wall_s": round(self.wall_s, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "prefill_s": round(self.prefill_s, 4),
            "draft_s": round(self.draft_s, 4),
            "verify_s": round(self.verify_s, 4),
        }
        if per_step:
            out.update(accepted_per_step=self.accepted, tree_sizes=self.tree_sizes, verified_per_step=self.verified,
                       depth_per_step=self.depths)
            if self.plans:
                out["plans"] = self.plans
        return out


@dataclass
class GenerationResult:
    token_ids: list[int]  # new tokens only
    text: str
    stats: GenerationStats
    prompt_tokens: int


class SpeculativeGenerator:
    """Generate with a target model, optionally sped up by a draft model and a tree policy."""

    def __init__(self, target, tokenizer, draft=None, policy: TreePolicy | str = "ar",
                 costs: OnlineCosts | None = None):
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        if self.policy.uses_draft and draft is None:
            raise CastspecError(f"policy '{self.policy.name}' needs a draft model (--draft)")
        if getattr(self.policy, "needs_costs", False):
            if costs is None:
                raise CastspecError(f"policy '{self.policy.name}' needs a cost table; use load_generator(), which "
                                    "loads or profiles one, or pass costs=")
            self.policy.attach_costs(costs)
        self.costs = costs
        self.tokenizer = tokenizer
        self.target = CausalLMRunner(target)
        self.drafter = DraftLM(CausalLMRunner(draft)) if draft is not None and self.policy.uses_draft else None
        if self.drafter is not None:
            check_same_vocabulary(target, draft)
        self.eos_ids = _eos_ids(target, tokenizer)

    # --- public API ----------------------------------------------------------------------------------------
    def generate(self, prompt: str | list[int] | torch.Tensor, max_new_tokens: int = 128, chat: bool = False,
                 on_tokens: Callable[[list[int]], None] | None = None) -> GenerationResult:
        """Generate greedily; identical tokens to the target's own greedy decoding, only faster."""
        input_ids = self.encode(prompt, chat)
        self._check_lengths(input_ids.shape[1], max_new_tokens)
        stats = GenerationStats()
        out: list[int] = []
        start = time.perf_counter()
        for tokens in self._decode(input_ids, max_new_tokens, stats):
            out.extend(tokens)
            if on_tokens is not None:
                on_tokens(tokens)
        stats.wall_s = time.perf_counter() - start
        stats.new_tokens = len(out)
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        return GenerationResult(token_ids=out, text=text, stats=stats, prompt_tokens=input_ids.shape[1])

    def stream(self, prompt: str | list[int] | torch.Tensor, max_new_tokens: int = 128,
               chat: bool = False) -> Iterator[str]:
        """Yield text pieces as tokens are accepted."""
        input_ids = self.encode(prompt, chat)
        self._check_lengths(input_ids.shape[1], max_new_tokens)
        out: list[int] = []
        shown = ""
        for tokens in self._decode(input_ids, max_new_tokens, GenerationStats()):
            out.extend(tokens)
            text = self.tokenizer.decode(out, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                continue
            yield text[len(shown):]
            shown = text

    def encode(self, prompt: str | list[int] | torch.Tensor, chat: bool = False) -> torch.Tensor:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise CastspecError("the prompt is empty")
            if chat:
                if not getattr(self.tokenizer, "chat_template", None):
                    raise CastspecError("--chat: this model's tokenizer has no chat template")
                ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                         add_generation_prompt=True, tokenize=True)
                if not isinstance(ids, list):
                    ids = ids["input_ids"]
            else:
                ids = self.tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, torch.Tensor):
            ids = prompt.reshape(-1).tolist()
        else:
            ids = list(prompt)
        if not ids:
            raise CastspecError("the prompt is empty")
        return torch.tensor([ids], dtype=torch.long, device=self.target.device)

    # --- the loop ------------------------------------------------------------------------------------------
    def _decode(self, input_ids: torch.Tensor, max_new_tokens: int, stats: GenerationStats) -> Iterator[list[int]]:
        batch = input_ids.shape[0]
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        t0 = time.perf_counter()
        root = self.target.prefill(input_ids, attention_mask).argmax(dim=-1)
        if self.drafter is not None:
            self.drafter.prefill(input_ids, attention_mask, root)
        stats.prefill_s = time.perf_counter() - t0
        produced = 1
        yield [int(root[0])]
        if int(root[0]) in self.eos_ids:
            return
        while produced < max_new_tokens:
            ctx = StepContext(batch_size=batch, context_len=int(self.target.next_pos.max()),
                              remaining=max_new_tokens - produced)
            self.policy.begin_step(ctx)
            t0 = time.perf_counter()
            tree = self._draft(root, ctx)
            t1 = time.perf_counter()
            nodes = self.policy.select(tree) if tree.size else tree.tokens
            vtree = tree.select(nodes)
            tokens, positions, block_mask = vtree.block_inputs(self.target.next_pos)
            self.target.begin_block()
            logits = self.target.forward(tokens, positions, block_mask)
            outcome = verify_greedy(vtree, logits)
            root_slot = torch.zeros_like(outcome.bonus)[:, None]
            self.target.commit(torch.cat([root_slot, outcome.path + 1], dim=1), outcome.n_accepted + 1)
            if self.drafter is not None:
                if tree.size:
                    self.drafter.commit(tree, vtree.nodes, outcome)
                else:
                    self.drafter.skip(outcome.bonus[:, None], torch.ones_like(outcome.bonus[:, None], dtype=torch.bool))
            t2 = time.perf_counter()
            root = outcome.bonus
            stats.steps += 1
            n_acc = int(outcome.n_accepted[0])
            stats.accepted.append(n_acc)
            stats.tree_sizes.append(tree.size)
            stats.verified.append(vtree.size)
            verified_depth = int(vtree.depth.max()) if vtree.size else 0
            stats.depths.append(verified_depth)
            stats.draft_s += t1 - t0
            stats.verify_s += t2 - t1
            plan = self.policy.plan()
            record = StepRecord(tree_size=tree.size, verified=vtree.size, depth=verified_depth,
                                accepted=outcome.n_accepted, draft_s=t1 - t0, verify_s=t2 - t1, plan=plan,
                                **_edge_outcomes(tree, vtree, outcome))
            self.policy.observe(record)
            if plan:
                stats.plans.append({**plan, "accepted": n_acc, "draft_ms": round(1000 * (t1 - t0), 2),
                                    "verify_ms": round(1000 * (t2 - t1), 2)})
            new = outcome.new_tokens[0, : n_acc + 1].tolist()
            new = new[: max_new_tokens - produced]
            for i, token in enumerate(new):
                if token in self.eos_ids:
                    new = new[: i + 1]
                    break
            produced += len(new)
            yield new
            if new[-1] in self.eos_ids:
                return

    def _draft(self, root: torch.Tensor, ctx: StepContext) -> DraftTree:
        """Grow the tree level by level; one draft forward per expanded level."""
        tree = DraftTree.empty(root)
        max_depth = min(self.policy.max_depth(), ctx.remaining - 1)
        if self.drafter is None or max_depth <= 0:
            return tree
        frontier_logp = self.drafter.start()  # [B, 1, V]
        frontier = None  # None: the root
        frontier_score = torch.zeros(root.shape[0], 1, device=root.device)
        for level in range(1, max_depth + 1):
            k = self.policy.children_per_node(level)
            child_logp, child_tok = frontier_logp.topk(k, dim=-1)  # [B, F, k]
            cand_score = (frontier_score[:, :, None] + child_logp).flatten(1)
            keep, n_expand = self.policy.choose(level, cand_score)
            if keep.shape[1] == 0:
                break
            from_frontier = keep // k
            parents = frontier.gather(1, from_frontier) if frontier is not None else torch.full_like(keep, -1)
            new_nodes = tree.add_level(child_tok.flatten(1).gather(1, keep), parents, cand_score.gather(1, keep))
            if n_expand == 0 or level == max_depth:
                break
            frontier = new_nodes[:, :n_expand]
            frontier_score = tree.logscore.gather(1, frontier)
            frontier_logp = self.drafter.expand(tree, frontier)
        return tree

    def _check_lengths(self, prompt_len: int, max_new_tokens: int) -> None:
        if max_new_tokens < 1:
            raise CastspecError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        margin = 256  # room for the largest tree a step may verify
        for runner in filter(None, [self.target, self.drafter.runner if self.drafter else None]):
            limit = runner.max_positions
            if limit and prompt_len + max_new_tokens + margin > limit:
                raise CastspecError(
                    f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds the model's context of "
                    f"{limit} positions (keep {margin} for the draft tree); shorten the prompt or --max-new-tokens")


def _edge_outcomes(tree: DraftTree, vtree, outcome) -> dict[str, torch.Tensor]:
    """Per verified node: its draft log-prob given its parent, whether its parent was accepted, and whether it was.

    Nodes whose parent was accepted are exactly the ones the target judged; they calibrate draft confidence.
    """
    batch, count = vtree.tokens.shape
    accepted = torch.zeros(batch, count + 1, dtype=torch.bool, device=vtree.tokens.device)
    accepted.scatter_(1, torch.where(outcome.path >= 0, outcome.path, count), True)
    accepted = accepted[:, :count]
    score = tree.logscore.gather(1, vtree.nodes)
    parent = vtree.parent_pos.clamp(min=0)
    is_child_of_root = vtree.parent_pos < 0
    parent_score = torch.where(is_child_of_root, 0.0, score.gather(1, parent))
    parent_accepted = is_child_of_root | accepted.gather(1, parent)
    return {"edge_logp": score - parent_score, "parent_accepted": parent_accepted, "node_accepted": accepted}


def check_same_vocabulary(target, draft) -> None:
    """The draft must speak the target's token ids, or its proposals are meaningless."""
    t_vocab, d_vocab = target.config.vocab_size, draft.config.vocab_size
    t_emb = target.get_input_embeddings().weight.shape[0]
    d_emb = draft.get_input_embeddings().weight.shape[0]
    if t_vocab != d_vocab or t_emb != d_emb:
        raise CastspecError(f"the draft's vocabulary ({d_vocab} tokens) differs from the target's ({t_vocab}); "
                            "use a draft with the same tokenizer")


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
