"""The decode loop's contracts with its parts: which model it touches, what the draft's cache holds after every
step whatever the policy returns, that caches are written in place, and what the batch statistics count."""

from __future__ import annotations

import torch

from castspec.engine import SpeculativeGenerator
from castspec.policies import make_policy
from castspec.policies.chain import ChainPolicy
from tests.conftest import ToyTokenizer, reference_greedy, tiny_model

PROMPT = [5, 17, 33, 2, 61, 8]


def pair():
    return tiny_model("qwen2", seed=11, sharpen=4.0), tiny_model("qwen2", seed=11, layers=1, sharpen=4.0)


def count_forwards(model) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_plain_decoding_never_touches_the_draft():
    """`ar` on a generator that holds a draft (as `generate --compare` does) must not prefill or feed it."""
    target, draft = pair()
    gen = SpeculativeGenerator(target, ToyTokenizer(), draft=draft, policy="chain:gamma=3")
    gen.generate(PROMPT, max_new_tokens=6)
    calls = count_forwards(draft)
    gen.policy = make_policy("ar")
    out = gen.generate(PROMPT, max_new_tokens=10)
    assert calls[0] == 0
    assert out.token_ids == reference_greedy(target, PROMPT, 10)


class SometimesEmpty(ChainPolicy):
    """A chain that, on every other step, drafts nothing after the drafter has already been started."""

    name = "sometimes-empty"

    def __init__(self, gen_ref: list, gamma: int = 3):
        super().__init__(gamma)
        self.gen_ref, self.step = gen_ref, 0
        self.draft_ptrs: set[int] = set()
        self.target_ptrs: set[int] = set()

    def begin_step(self, ctx) -> None:
        super().begin_step(ctx)
        self.step += 1

    def choose(self, level, cand_logscore, cand_source=None):
        if self.step % 2 == 0:
            return torch.zeros_like(cand_logscore[:, :0], dtype=torch.long), 0
        return super().choose(level, cand_logscore)

    def observe(self, record) -> None:
        """After each step: the draft's cache + its pending tokens are exactly the sequence so far."""
        gen = self.gen_ref[0]
        drafter = gen.drafter
        known = gen.target.cache.length + 1  # committed tokens + the new root
        assert (drafter.runner.cache.length + drafter.pending_valid.sum(dim=1)).tolist() == known.tolist()
        self.draft_ptrs.add(drafter.runner.cache.kv.data_ptr())
        self.target_ptrs.add(gen.target.cache.kv.data_ptr())


def test_draft_cache_stays_exact_when_a_policy_returns_an_empty_tree():
    target, draft = pair()
    ref: list = []
    policy = SometimesEmpty(ref)
    gen = SpeculativeGenerator(target, ToyTokenizer(), draft=draft, policy=policy)
    ref.append(gen)
    out = gen.generate(PROMPT, max_new_tokens=24)
    assert out.token_ids == reference_greedy(target, PROMPT, 24)
    assert policy.step >= 4
    # The draft's committed entries are the keys/values of exactly the sequence's first tokens.
    sequence = PROMPT + out.token_ids
    length = int(gen.drafter.runner.cache.length[0])
    with torch.no_grad():
        reference = draft(torch.tensor([sequence[:length]]), use_cache=True).past_key_values
    torch.testing.assert_close(gen.drafter.runner.cache.kv[0, 0, 0, :, :length], reference.layers[0].keys[0])
    # Written in place: one buffer per model for the whole generation, never reallocated or copied per step.
    assert len(policy.draft_ptrs) == 1 and len(policy.target_ptrs) == 1


def test_batch_stats_count_every_step_until_the_last_row_finishes():
    """Rows that finish early must not stop the batch's clocks (bench reads decode time from them)."""
    target, draft = pair()
    gen = SpeculativeGenerator(target, ToyTokenizer(), draft=draft, policy="chain:gamma=2")
    short, long = [9, 4, 7], [30, 31, 32, 33]
    long_out = reference_greedy(target, long, 16)
    early_eos = next(t for t in reference_greedy(target, short, 3) if t not in long_out)
    gen.eos_ids = {early_eos}
    results = gen.generate_batch([short, long], max_new_tokens=16)
    first, second = (r.stats for r in results)
    batch = results[0].batch_stats
    assert results[1].batch_stats is batch
    assert len(results[0].token_ids) <= 3 and len(results[1].token_ids) == 16
    assert first.steps < second.steps == batch.steps
    assert batch.draft_s >= second.draft_s > first.draft_s
    assert batch.verify_s >= second.verify_s > first.verify_s
    assert batch.new_tokens == len(results[0].token_ids) + len(results[1].token_ids)
    assert first.wall_s < second.wall_s <= batch.wall_s
    assert first.tokens_per_s == len(results[0].token_ids) / first.wall_s


def test_a_draft_window_prefills_the_draft_on_the_prompts_tail_and_stays_exact():
    """`draft_window=3`: the draft reads each prompt's last 3 tokens (its cache = window + output so far, keys equal
    the draft run on exactly that text), in a batch with prompts shorter and longer than the window; the target's
    output is unchanged."""
    target, draft = pair()
    prompts = [PROMPT, [9, 4], [40, 41, 42, 43, 44, 45, 46, 47]]
    gen = SpeculativeGenerator(target, ToyTokenizer(), draft=draft, policy="chain:gamma=3", draft_window=3)
    results = gen.generate_batch(prompts, max_new_tokens=12)
    for prompt, result in zip(prompts, results, strict=True):
        assert result.token_ids == reference_greedy(target, prompt, 12)
    gen.generate(PROMPT, max_new_tokens=12)
    seen = PROMPT[-3:] + reference_greedy(target, PROMPT, 12)
    length = int(gen.drafter.runner.cache.length[0])
    assert 3 < length < len(seen)
    with torch.no_grad():
        reference = draft(torch.tensor([seen[:length]]), use_cache=True).past_key_values
    torch.testing.assert_close(gen.drafter.runner.cache.kv[0, 0, 0, :, :length], reference.layers[0].keys[0])


def test_a_draft_window_must_be_a_whole_number():
    import pytest

    from castspec.errors import CastspecError

    target, draft = pair()
    for bad in (-1, 2.5, True):
        with pytest.raises(CastspecError, match="draft_window"):
            SpeculativeGenerator(target, ToyTokenizer(), draft=draft, policy="chain", draft_window=bad)


def test_stop_strings_cut_the_text_and_end_only_their_row(tmp_path):
    """`stop`: the text ends before the first stop string and that sequence leaves the batch; the other row of the
    batch runs on to its budget, unchanged."""
    from castspec import api
    from tests.test_cli import save_tiny

    gen = api.load_generator(save_tiny(tmp_path / "t"), save_tiny(tmp_path / "d", layers=1), policy="chain")
    prompts = ["hello world", "abc"]
    free = gen.generate_batch(prompts, max_new_tokens=24)
    stop = free[0].text[6:8]  # a string that first occurs mid-output
    cut = free[0].text.find(stop)
    stopped = gen.generate_batch(prompts, max_new_tokens=24, stop=[stop])
    assert stopped[0].text == free[0].text[:cut]
    assert len(stopped[0].token_ids) < len(free[0].token_ids)
    assert stopped[1].token_ids == free[1].token_ids or stop in free[1].text
    assert gen.generate(prompts[0], max_new_tokens=24, stop=[stop]).text == free[0].text[:cut]


def test_the_next_turn_prefills_only_what_it_adds_and_decodes_as_plain_decoding_does():
    """A follow-up prompt (the last prompt, its answer, a new message) reuses both models' caches of the last
    sequence; the output is still exactly the target's greedy decoding."""
    target, draft = pair()
    gen = SpeculativeGenerator(target, ToyTokenizer(), draft=draft, policy="chain:gamma=3")
    first = gen.generate(PROMPT, max_new_tokens=12).token_ids
    follow_up = PROMPT + first + [7, 9, 11]
    out = gen.generate(follow_up, max_new_tokens=12)
    assert out.token_ids == reference_greedy(target, follow_up, 12)
    assert gen.target.prefilled_tokens == 4  # the answer's last token and the new message: the cache held the rest
    assert gen.drafter.runner.prefilled_tokens <= 5


def test_forget_prefix_keeps_nothing_of_the_sequences_so_far():
    """After `forget_prefix` a prompt is prefilled whole, even one the cache's last row starts with (a batch that
    emptied leaves its rows in the cache until the next prefill, which would otherwise keep them)."""
    target, draft = pair()
    gen = SpeculativeGenerator(target, ToyTokenizer(), draft=draft, policy="chain:gamma=3")
    out = gen.generate(PROMPT, max_new_tokens=12).token_ids
    gen.forget_prefix()
    again = gen.generate(PROMPT + out[:3], max_new_tokens=4)
    assert gen.target.prefilled_tokens == gen.drafter.runner.prefilled_tokens == len(PROMPT) + 3
    assert again.stats.cached_tokens == 0


def test_interleaved_conversations_each_find_their_own_prefix():
    """Two conversations take turns (a server's clients): the next turn of the first still prefills only what it
    adds, and a kept prefix that a newer one extends is dropped."""
    target, draft = pair()
    gen = SpeculativeGenerator(target, ToyTokenizer(), draft=draft, policy="chain:gamma=3")
    first, other = [5, 17, 33, 4, 61, 8], [40, 41, 42, 43]
    answer = gen.generate(first, max_new_tokens=8).token_ids
    gen.generate(other, max_new_tokens=8)
    follow_up = first + answer + [7, 9]
    out = gen.generate(follow_up, max_new_tokens=8)
    assert gen.target.prefilled_tokens == 3 and out.stats.cached_tokens == len(follow_up) - 3
    assert out.token_ids == reference_greedy(target, follow_up, 8)
    gen.generate([50, 51], max_new_tokens=2)  # keeps the follow-up's row, which extends the first conversation's
    assert len(gen.target.kept) == 2
