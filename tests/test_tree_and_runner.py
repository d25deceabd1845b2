"""The tree mask, positions and KV commit, each checked against a plain recomputation without a tree."""

from __future__ import annotations

import torch

from castspec.models.runner import CausalLMRunner
from castspec.policies.base import top_nodes_by_score
from castspec.tree import DraftTree
from castspec.verify import verify_greedy
from tests.conftest import tiny_model


def build_tree() -> DraftTree:
    """root -> a(0), b(1);  a -> c(2), d(3);  c -> e(4)."""
    tree = DraftTree.empty(torch.tensor([7]))
    tree.add_level(torch.tensor([[10, 11]]), torch.tensor([[-1, -1]]), torch.tensor([[-0.1, -1.0]]))
    tree.add_level(torch.tensor([[12, 13]]), torch.tensor([[0, 0]]), torch.tensor([[-0.3, -2.0]]))
    tree.add_level(torch.tensor([[14]]), torch.tensor([[2]]), torch.tensor([[-0.5]]))
    return tree


def test_tree_structure():
    tree = build_tree()
    assert tree.depth.tolist() == [[1, 1, 2, 2, 3]]
    anc = tree.ancestors[0].int().tolist()
    assert anc[4] == [1, 0, 1, 0, 1]  # e: a, c, itself
    assert anc[3] == [1, 0, 0, 1, 0]
    assert anc[1] == [0, 1, 0, 0, 0]


def test_top_nodes_is_a_subtree_and_select_orders_by_depth():
    tree = build_tree()
    chosen = top_nodes_by_score(tree, 3)
    assert sorted(chosen[0].tolist()) == [0, 2, 4]  # a, c, e beat b (-1.0) and d (-2.0)
    vtree = tree.select(chosen)
    assert vtree.depth.tolist() == [[1, 2, 3]]
    assert vtree.parent_pos.tolist() == [[-1, 0, 1]]


def test_select_rejects_orphans():
    tree = build_tree()
    try:
        tree.select(torch.tensor([[4]]))
    except ValueError:
        return
    raise AssertionError("a node without its parent must be refused")


def test_tree_forward_matches_each_path_recomputed(arch):
    """Logits of every node in one tree forward equal a fresh forward over prefix + that node's path."""
    model = tiny_model(arch, seed=3)
    runner = CausalLMRunner(model)
    prefix = torch.tensor([[3, 9, 27, 81, 50, 60, 70, 11, 12, 13]])  # longer than gemma's sliding window (8)
    runner.prefill(prefix.tolist())
    tree = build_tree()
    vtree = tree.select(torch.arange(tree.size)[None])
    tokens, positions, mask = vtree.block_inputs(runner.next_pos)
    assert positions.tolist() == [[10, 11, 11, 12, 12, 13]]  # prefix_len + depth, not flat index
    runner.begin_block()
    logits = runner.forward(tokens, positions, mask)
    paths = {0: [7], 1: [7, 10], 2: [7, 11], 3: [7, 10, 12], 4: [7, 10, 13], 5: [7, 10, 12, 14]}
    with torch.no_grad():
        for slot, path in paths.items():
            full = model(torch.cat([prefix, torch.tensor([path])], dim=1)).logits[0, -1]
            torch.testing.assert_close(logits[0, slot], full, atol=1e-9, rtol=1e-9)


def test_commit_keeps_exactly_the_accepted_path(arch):
    """After committing a path, the next forward sees the same cache as if the path had been decoded plainly."""
    model = tiny_model(arch, seed=4)
    runner = CausalLMRunner(model)
    prefix = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13]])
    runner.prefill(prefix.tolist())
    tree = build_tree()
    vtree = tree.select(torch.arange(tree.size)[None])
    tokens, positions, mask = vtree.block_inputs(runner.next_pos)
    runner.begin_block()
    runner.forward(tokens, positions, mask)
    runner.commit(torch.tensor([[0, 1, 3, 5]]), torch.tensor([4]))  # root, a, c, e
    assert runner.next_pos.tolist() == [13]
    assert runner.cache.length.tolist() == [13] and runner.cache.get_seq_length() == 13
    runner.begin_block()
    nxt = runner.forward(torch.tensor([[42]]), runner.next_pos[:, None], torch.ones(1, 1, 1, dtype=torch.bool))
    with torch.no_grad():
        full = model(torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 7, 10, 12, 14, 42]])).logits[0, -1]
    torch.testing.assert_close(nxt[0, -1], full, atol=1e-9, rtol=1e-9)


def test_commit_different_lengths_per_row():
    """Two prompts of different lengths, each row keeps a different number of tokens: both match recomputation."""
    model = tiny_model("qwen2", seed=5)
    runner = CausalLMRunner(model)
    prompts = [[4, 5, 6, 7], [8, 9]]
    last = runner.prefill(prompts)
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            torch.testing.assert_close(last[row], model(torch.tensor([prompt])).logits[0, -1], atol=1e-9, rtol=1e-9)
    runner.begin_block()
    chain = torch.tensor([[20, 21, 22], [30, 31, 32]])
    positions = runner.next_pos[:, None] + torch.arange(3)
    runner.forward(chain, positions, torch.ones(3, 3, dtype=torch.bool).tril()[None].expand(2, -1, -1))
    runner.commit(torch.tensor([[0, 1, 2], [0, 0, 0]]), torch.tensor([3, 1]))
    assert runner.cache.length.tolist() == [7, 3]
    runner.begin_block()
    out = runner.forward(torch.tensor([[50], [51]]), runner.next_pos[:, None], torch.ones(2, 1, 1, dtype=torch.bool))
    with torch.no_grad():
        a = model(torch.tensor([[4, 5, 6, 7, 20, 21, 22, 50]])).logits[0, -1]
        b = model(torch.tensor([[8, 9, 30, 51]])).logits[0, -1]
    torch.testing.assert_close(out[0, -1], a, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(out[1, -1], b, atol=1e-9, rtol=1e-9)


def test_cache_holds_exactly_the_accepted_tokens_after_many_steps(arch):
    """After N tree steps with different acceptance per row, each row's cache length is prompt + accepted tokens
    exactly, its entries are those tokens' keys/values, and logits equal a cache-free recomputation."""
    model = tiny_model(arch, seed=6)
    runner = CausalLMRunner(model)
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]
    runner.prefill(prompts)
    generator = torch.Generator().manual_seed(0)
    sequences = [list(p) for p in prompts]
    tree = build_tree()  # root, a, b, c, d, e: accepted paths are prefixes of root-a-c-e or root-b
    paths = [[0, 1, 3, 5], [0, 2], [0, 1, 4], [0], [0, 1, 3]]  # block slots of root and accepted nodes
    vtree = tree.select(torch.arange(tree.size)[None])
    for step in range(6):
        tokens = torch.randint(20, 90, (3, tree.size + 1), generator=generator)
        _, positions, mask = vtree.block_inputs(runner.next_pos)  # the same tree shape, each row its own tokens
        runner.begin_block()
        logits = runner.forward(tokens, positions, mask.expand(3, -1, -1))
        with torch.no_grad():  # the block's root sees its row's committed tokens only
            for row in range(3):
                full = model(torch.tensor([sequences[row] + [int(tokens[row, 0])]])).logits[0, -1]
                torch.testing.assert_close(logits[row, 0], full, atol=1e-9, rtol=1e-9)
        keep = [paths[(step + row) % len(paths)] for row in range(3)]
        width = max(len(k) for k in keep)
        runner.commit(torch.tensor([k + [0] * (width - len(k)) for k in keep]), torch.tensor([len(k) for k in keep]))
        for row in range(3):
            sequences[row] += [int(tokens[row, slot]) for slot in keep[row]]
        assert runner.cache.length.tolist() == [len(s) for s in sequences]
    with torch.no_grad():
        for row, seq in enumerate(sequences):  # every committed slot holds that token's keys and values
            reference = model(torch.tensor([seq]), use_cache=True).past_key_values
            for layer in range(model.config.num_hidden_layers):
                expected = reference.layers[layer].keys[0]  # a sliding layer keeps only its window: compare that
                stored = runner.cache.kv[layer, 0, row, :, len(seq) - expected.shape[1]: len(seq)]
                torch.testing.assert_close(stored, expected, atol=1e-9, rtol=1e-9)


def test_finished_rows_leave_and_the_rest_stay_exact():
    model = tiny_model("llama", seed=7)
    runner = CausalLMRunner(model)
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10], [11, 12]]
    runner.prefill(prompts)
    runner.keep_rows([0, 2])
    assert runner.cache.length.tolist() == [3, 2]
    runner.begin_block()
    out = runner.forward(torch.tensor([[40], [41]]), runner.next_pos[:, None], torch.ones(2, 1, 1, dtype=torch.bool))
    with torch.no_grad():
        torch.testing.assert_close(out[0, -1], model(torch.tensor([[3, 4, 5, 40]])).logits[0, -1])
        torch.testing.assert_close(out[1, -1], model(torch.tensor([[11, 12, 41]])).logits[0, -1])


def test_verify_greedy_accepts_longest_matching_path():
    tree = build_tree()
    vtree = tree.select(torch.arange(tree.size)[None])  # slots: root, a, b, c, d, e
    vocab = 20
    argmax_at_slot = [10, 12, 0, 19, 0, 0]  # root->a ok, a->c ok, c->e? wants 19, e is 14: reject
    logits = torch.zeros(1, 6, vocab)
    for slot, token in enumerate(argmax_at_slot):
        logits[0, slot, token] = 1.0
    out = verify_greedy(vtree, logits)
    assert out.n_accepted.tolist() == [2]
    assert out.path.tolist() == [[0, 2, -1]]
    assert out.bonus.tolist() == [19]
    assert out.new_tokens[0, :3].tolist() == [10, 12, 19]


def test_cache_grows_when_a_block_outruns_its_reserve():
    """A block longer than the reserved slots grows the buffer once and stays exact (committed part included)."""
    model = tiny_model("qwen2", seed=8)
    runner = CausalLMRunner(model)
    prompt = [3, 4, 5, 6]
    runner.prefill([prompt])
    before = runner.cache.capacity
    chain = torch.arange(10, 10 + before, dtype=torch.long)[None] % 90 + 3
    runner.begin_block()
    n = chain.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None]
    logits = runner.forward(chain, runner.next_pos[:, None] + torch.arange(n), causal)
    assert runner.cache.capacity > before
    with torch.no_grad():
        full = model(torch.cat([torch.tensor([prompt]), chain], dim=1)).logits[0, -1]
    torch.testing.assert_close(logits[0, -1], full, atol=1e-9, rtol=1e-9)
