"""The draft tree as batched tensors.

One tree per sequence, all with the same number of nodes N (the tree *shape* is shared by the batch; which tokens
fill it is chosen per sequence). Node 0..N-1 are drafted tokens; the root — the last accepted token, not yet in
the target's cache — is kept apart and has depth 0. Nodes are appended level by level, so a parent always has a
smaller index than its children. A node may hold the padding token -1 (`castspec.drafters.base.NO_TOKEN`): it is fed
to models as 0 and can never be accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DraftTree:
    root: torch.Tensor  # [B] last accepted token of each sequence
    tokens: torch.Tensor  # [B, N]
    parents: torch.Tensor  # [B, N] node index of the parent, -1 for children of the root
    depth: torch.Tensor  # [B, N] 1 for children of the root
    logscore: torch.Tensor  # [B, N] log of the path probability under the draft (sum of log-probs)
    ancestors: torch.Tensor  # [B, N, N] bool, ancestors[b, i, j]: j is i or an ancestor of i
    draft_slot: torch.Tensor  # [B, N] slot of the node in the draft's step block, -1 if never fed to the draft
    source: torch.Tensor  # [B, N] who proposed the node (`castspec.drafters.base.SOURCE_*`)

    @classmethod
    def empty(cls, root: torch.Tensor) -> DraftTree:
        batch, device = root.shape[0], root.device
        long = dict(dtype=torch.long, device=device)
        return cls(
            root=root,
            tokens=torch.zeros(batch, 0, **long),
            parents=torch.zeros(batch, 0, **long),
            depth=torch.zeros(batch, 0, **long),
            logscore=torch.zeros(batch, 0, dtype=torch.float32, device=device),
            ancestors=torch.zeros(batch, 0, 0, dtype=torch.bool, device=device),
            draft_slot=torch.zeros(batch, 0, **long),
            source=torch.zeros(batch, 0, **long),
        )

    @property
    def size(self) -> int:
        return self.tokens.shape[1]

    @property
    def batch_size(self) -> int:
        return self.root.shape[0]

    def add_level(self, tokens: torch.Tensor, parents: torch.Tensor, logscore: torch.Tensor,
                  source: torch.Tensor | None = None) -> torch.Tensor:
        """Append W nodes per sequence whose parents (node index, or -1 for the root) already exist (`source`:
        who proposed each, default the draft model).

        Returns the new nodes' indices [B, W].
        """
        batch, width = tokens.shape
        old = self.size
        new_idx = torch.arange(old, old + width, device=tokens.device).expand(batch, width)
        parent_depth = torch.where(parents >= 0, self.depth.gather(1, parents.clamp(min=0)), 0) if old else 0
        depth = torch.zeros_like(tokens) + parent_depth + 1
        # A new node's ancestors are its parent's ancestors plus itself.
        anc = torch.zeros(batch, old + width, old + width, dtype=torch.bool, device=tokens.device)
        anc[:, :old, :old] = self.ancestors
        if old:
            parent_rows = self.ancestors.gather(1, parents.clamp(min=0)[:, :, None].expand(-1, -1, old))
            anc[:, old:, :old] = parent_rows & (parents >= 0)[:, :, None]
        anc[:, old:, old:] = torch.eye(width, dtype=torch.bool, device=tokens.device)
        self.tokens = torch.cat([self.tokens, tokens], dim=1)
        self.parents = torch.cat([self.parents, parents], dim=1)
        self.depth = torch.cat([self.depth, depth], dim=1)
        self.logscore = torch.cat([self.logscore, logscore.float()], dim=1)
        self.ancestors = anc
        self.draft_slot = torch.cat([self.draft_slot, torch.full_like(tokens, -1)], dim=1)
        self.source = torch.cat([self.source, torch.zeros_like(tokens) if source is None else source], dim=1)
        return new_idx

    def select(self, nodes: torch.Tensor) -> VerifyTree:
        """The subtree made of `nodes` [B, M] (must be closed under ancestors), flattened in depth order."""
        order = torch.sort(self.depth.gather(1, nodes), dim=1, stable=True).indices
        nodes = nodes.gather(1, order)
        batch, count = nodes.shape
        position_in_subset = torch.full((batch, self.size + 1), -1, dtype=torch.long, device=nodes.device)
        position_in_subset.scatter_(1, nodes, torch.arange(count, device=nodes.device).expand(batch, count))
        parents = self.parents.gather(1, nodes)
        parent_pos = torch.where(parents >= 0, position_in_subset.gather(1, parents.clamp(min=0)), -1)
        check_closed(parents, parent_pos)
        rows = self.ancestors.gather(1, nodes[:, :, None].expand(-1, -1, self.size))
        ancestors = rows.gather(2, nodes[:, None, :].expand(-1, count, -1))
        return VerifyTree(
            root=self.root,
            nodes=nodes,
            tokens=self.tokens.gather(1, nodes),
            depth=self.depth.gather(1, nodes),
            parent_pos=parent_pos,
            ancestors=ancestors,
        )


def check_closed(parents: torch.Tensor, parent_pos: torch.Tensor) -> None:
    """Every selected node's parent must be selected too: a node with a parent node (`parents` >= 0) but no parent
    position in the selection (`parent_pos` -1) means the selection is not closed under ancestors.

    The step's one value check of the selection (a host sync); kept apart so device tests can stub it.
    """
    if bool(((parents >= 0) & (parent_pos < 0)).any()):
        raise ValueError("selected nodes are not closed under ancestors")


@dataclass
class VerifyTree:
    """The nodes sent to the target: root first (block slot 0), then node j at block slot j + 1."""

    root: torch.Tensor  # [B]
    nodes: torch.Tensor  # [B, M] indices into the DraftTree
    tokens: torch.Tensor  # [B, M]
    depth: torch.Tensor  # [B, M]
    parent_pos: torch.Tensor  # [B, M] position of the parent in this subset, -1 for the root
    ancestors: torch.Tensor  # [B, M, M] bool, includes self

    @property
    def size(self) -> int:
        return self.tokens.shape[1]

    def block_inputs(self, next_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens, positions and the [B, 1+M, 1+M] mask for one target forward over root + nodes.

        Positions are `next_pos + depth`: siblings share a position, exactly as each would have in plain decoding.
        """
        batch, count = self.tokens.shape
        tokens = torch.cat([self.root[:, None], self.tokens.clamp(min=0)], dim=1)  # a padding node (-1) feeds 0
        depth = torch.cat([torch.zeros_like(self.root)[:, None], self.depth], dim=1)
        positions = next_pos[:, None] + depth
        mask = torch.zeros(batch, count + 1, count + 1, dtype=torch.bool, device=tokens.device)
        mask[:, :, 0] = True
        mask[:, 1:, 1:] = self.ancestors
        mask[:, 0, 0] = True
        return tokens, positions, mask
