"""The command line: a working run on tiny saved models, and a clear error with exit code 2 for bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import Qwen2Tokenizer

from castspec.cli import main
from tests.conftest import tiny_model


def save_tiny(path, seed=0, layers=2, alphabet="abcdefghijklmnopqrstuvwxyz0123456789", hidden=32):
    """A tiny Qwen2 model with a real (byte-level BPE, one token per character) tokenizer, saved as a HF dir."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for char in "Ġ" + alphabet:
        vocab[char] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                               unk_token=None)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(path)
    tiny_model("qwen2", seed=seed, layers=layers, hidden=hidden, sharpen=4.0).to(torch.float32).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    target = save_tiny(root / "target", seed=0)
    draft = save_tiny(root / "draft", seed=0, layers=1)
    other = root / "other"
    save_tiny(other, seed=2, alphabet="zyxwvu")
    return target, draft, str(other)


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_json_with_compare(pair, capsys):
    target, draft, _ = pair
    code, out, err = run(capsys, "generate", "--target", target, "--draft", draft, "--policy", "static",
                         "--prompt", "hello world", "--max-new-tokens", "12", "--json", "--compare")
    assert code == 0, err
    result = json.loads(out)
    assert result["new_tokens"] == len(result["token_ids"]) == 12
    assert set(result["stats"]) >= {"steps", "mean_accept_len", "wall_s", "tokens_per_s"}
    assert result["ar"]["identical"] is True
    assert result["speedup_vs_ar"] > 0


def test_generate_streams_text_and_names_the_baseline(pair, capsys):
    target, draft, _ = pair
    code, out, err = run(capsys, "generate", "--target", target, "--draft", draft, "--policy", "chain:gamma=2",
                         "--prompt", "hello", "--max-new-tokens", "5", "--compare")
    assert code == 0, err
    assert out.strip()
    assert "tok/s" in err
    assert "[ar: plain decoding, target only, no draft] 5 tokens" in err  # what the speedup is measured against
    assert "speedup over plain decoding (ar):" in err and "identical output" in err


def test_generate_stops_before_a_stop_string_streamed_and_in_json(pair, capsys):
    """--stop: the streamed text and the JSON text both end before the first stop string."""
    target, draft, _ = pair
    base = ["generate", "--target", target, "--draft", draft, "--policy", "chain", "--prompt", "hello world",
            "--max-new-tokens", "20"]
    code, out, err = run(capsys, *base, "--json")
    assert code == 0, err
    full = json.loads(out)["text"]
    stop = full[4:6]
    code, out, err = run(capsys, *base, "--json", "--stop", stop)
    assert code == 0, err
    assert json.loads(out)["text"] == full[: full.find(stop)]
    code, out, err = run(capsys, *base, "--stop", stop)
    assert code == 0, err
    assert out == full[: full.find(stop)] + "\n"


def _fake_profile(grids):
    """A stand-in for the profiler (tiny models take ~40 s to profile on a busy CPU): a flat table on the grid."""
    from castspec.cost.profiler import expected_meta
    from castspec.cost.table import CostTable

    def profile(models, grid, progress=True):
        grids.append(grid)
        ms = {role: [[[1.0 + n for n in grid.tokens] for _ in grid.contexts] for _ in grid.batch_sizes]
              for role in models}
        return CostTable(meta=expected_meta(models), batch_sizes=list(grid.batch_sizes),
                         contexts=list(grid.contexts), tokens=list(grid.tokens), ms=ms)

    return profile


def test_batch_generation_profiles_every_batch_size_it_uses(pair, capsys, tmp_path, monkeypatch):
    """A fresh machine: `--batch-size 3` must measure costs for batches of 1..3, not only 1 (lookups would clamp)."""
    target, draft, _ = pair
    grids = []
    monkeypatch.setenv("CASTSPEC_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("castspec.cost.profiler.profile", _fake_profile(grids))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\nabc\nxyz\n")
    code, out, err = run(capsys, "generate", "--target", target, "--draft", draft, "--policy", "cast",
                         "--prompt-file", str(prompts), "--batch-size", "3", "--max-new-tokens", "3", "--json")
    assert code == 0, err
    assert [g.batch_sizes for g in grids] == [[1, 2, 3]]
    assert len(json.loads(out)) == 3 and "warning" not in err


GEN = ["generate", "--target", "{target}", "--draft", "{draft}", "--max-new-tokens", "4"]
BENCH = ["bench", "--target", "{target}", "--draft", "{draft}", "--out", "{tmp}/out", "--max-new-tokens", "4"]


@pytest.mark.parametrize("argv, message", [
    # models and prompts
    (GEN + ["--target", "no-such-model"], "unknown model"),
    (GEN + ["--target", "/nonexistent/dir"], "unknown model"),
    (GEN + ["--draft", "{other}", "--policy", "chain"], "tokenizer"),
    (GEN + ["--prompt", "   "], "prompt is empty"),
    (GEN + ["--prompt", "ab " * 1000], "exceeds the model's context"),
    (GEN + ["--prompt-file", "/nonexistent/prompt.txt"], "cannot read --prompt-file: No such file"),
    (GEN + ["--prompt-file", "{tmp}"], "cannot read --prompt-file: Is a directory"),
    (GEN + ["--prompt-file", "{tmp}/empty.txt"], "is empty"),
    (GEN + ["--prompt-file", "{tmp}/blank.txt"], "is empty"),
    (GEN + ["--prompt-file", "{tmp}/binary.txt"], "not UTF-8 text"),
    # policies
    (GEN + ["--policy", "nonsense"], "unknown policy 'nonsense': choose one of ar, cast, chain"),
    (GEN + ["--policy", "cast:C1=abc"], "C1 must be a number, got 'abc'"),
    (GEN + ["--policy", "chain:gamma=2.5"], "gamma must be a whole number"),
    (GEN + ["--policy", "chain:gamma=x=1"], "bad parameters for policy 'chain'"),
    (GEN + ["--policy", "chain:depth=3"], "no parameter 'depth' (its parameters are gamma)"),
    (GEN + ["--policy", "eagle2:topk=3"], "its parameters are total_tokens, depth, top_k"),
    (GEN + ["--policy", "ar:gamma=3"], "takes no parameters"),
    (GEN + ["--policy", "cast:mode=fast"], "mode must be"),
    (GEN + ["--policy", "eagle2:top_k=500,depth=2"], "top_k=500 is larger than the vocabulary (97 tokens)"),
    (GEN + ["--policy", "static:paths=0;120"], "child rank 120 of a node but the vocabulary has only 97"),
    # sampling
    (GEN + ["--temperature", "-1"], "temperature must be"),
    (GEN + ["--temperature", "nan"], "temperature must be"),
    (GEN + ["--top-p", "0"], "top_p must be in (0, 1]"),
    (GEN + ["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (GEN + ["--top-k", "-1"], "top_k must be a whole number >= 0"),
    # sizes
    (GEN + ["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (GEN + ["--batch-size", "2"], "--batch-size needs --prompt-file"),
    (GEN + ["--batch-size", "2", "--prompt-file", "{tmp}/two.txt", "--compare"], "--compare measures one prompt"),
    (GEN + ["--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1"),
    (GEN + ["--max-new-tokens", "ten"], "argument --max-new-tokens: expected a whole number"),
    (["generate", "--bogus"], "unrecognized arguments: --bogus"),
    (["generate", "--target-dtype", "int8", "--device", "cuda"], "--target-dtype int8 runs on the CPU only"),
    (["generate", "--target-dtype", "q4k", "--device", "cuda"], "--target-dtype q4k runs on the CPU only"),
    (["generate", "--draft-quant", "q4k", "--device", "cuda"], "--draft-quant q4k runs on the CPU only"),
    (["generate", "--target-dtype", "int4"], "invalid choice: 'int4'"),
    (["generate", "--stop", ""], "--stop needs a non-empty text"),
    (["generate", "--suffix-cache", "4"], "--suffix-cache) needs suffix drafting"),
    (["generate", "--draft-window", "-1"], "--draft-window"),
    (["profile", "--batch-sizes", "0,2"], "--batch-sizes needs positive whole numbers"),
    (["profile", "--out", "/proc/castspec/table.json"], "cannot write to --out /proc/castspec"),
    # bench: the same flags, the same errors
    (BENCH + ["--batch-size", "0"], "--batch-size needs positive whole numbers"),
    (BENCH + ["--temperature", "-0.5"], "temperature must be"),
    (BENCH + ["--top-p", "2"], "top_p must be in (0, 1]"),
    (BENCH + ["--top-k", "-3"], "top_k must be a whole number >= 0"),
    (BENCH + ["--num-prompts", "0"], "argument --num-prompts: must be at least 1"),
    (BENCH + ["--methods", "ar,cast:C1=abc"], "C1 must be a number"),
    (BENCH + ["--methods", "ar,chain:depth=3"], "its parameters are gamma"),
    (BENCH + ["--methods", "ar,eagle3"], "unknown policy 'eagle3'"),
    (BENCH + ["--methods", "ar,eagle2:top_k=500/depth=2"], "top_k=500 is larger than the vocabulary"),
    (BENCH + ["--dataset", "squad"], "unknown dataset"),
    (BENCH + ["--out", "{tmp}/blank.txt/out"], "cannot write to --out"),
    (BENCH + ["--gguf", "{tmp}/model.gguf"], "are for the llama.cpp methods, which --methods does not include"),
])
def test_bad_input_is_one_clear_error_line(pair, capsys, tmp_path, argv, message):
    """Every bad input: exit code 2, one stderr line `castspec: error: ...` saying what is wrong, no traceback."""
    target, draft, other = pair
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text(" \n\t\n  \n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00hello\x80")
    (tmp_path / "two.txt").write_text("hello\nworld\n")
    argv = [a.format(target=target, draft=draft, other=other, tmp=tmp_path) for a in argv]
    if argv[0] == "generate" and "--prompt" not in argv and "--prompt-file" not in argv:
        argv += ["--prompt", "hello"]
    if argv[0] == "generate" and "--policy" not in argv:
        argv += ["--policy", "chain"]
    code, out, err = run(capsys, *argv)
    errors = [line for line in err.splitlines() if line.startswith("castspec: error: ")]
    assert code == 2, err
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err  # (after model-loading progress, if any)
    assert message in errors[0]
    assert "Traceback" not in err and "usage:" not in err and out == ""


def test_sampling_with_seed_repeats(pair, capsys):
    target, draft, _ = pair
    argv = ["generate", "--target", target, "--draft", draft, "--policy", "chain", "--prompt", "hello",
            "--max-new-tokens", "8", "--json", "--temperature", "0.9", "--top-k", "20", "--seed", "3"]
    first = json.loads(run(capsys, *argv)[1])
    second = json.loads(run(capsys, *argv)[1])
    assert first["token_ids"] == second["token_ids"]


def test_batch_prompt_file(pair, capsys, tmp_path):
    target, draft, _ = pair
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\nabc\n\nxyz 12\n")
    code, out, err = run(capsys, "generate", "--target", target, "--draft", draft, "--policy", "static",
                         "--prompt-file", str(prompts), "--batch-size", "2", "--max-new-tokens", "6", "--json")
    assert code == 0, err
    results = json.loads(out)
    assert [r["index"] for r in results] == [0, 1, 2]
    assert all(r["new_tokens"] == 6 for r in results)
    assert [(r["batch"]["rows"], r["batch"]["new_tokens"]) for r in results] == [(2, 12), (2, 12), (1, 6)]
    assert all(r["stats"]["wall_s"] <= r["batch"]["wall_s"] for r in results)  # a row's latency, within its call


def _spec_bench_file(path):
    rows = [{"question_id": 1, "category": "qa", "turns": ["who is x"]},
            {"question_id": 2, "category": "qa", "turns": ["what is y"]},
            {"question_id": 3, "category": "qa", "turns": ["why z"]},
            {"question_id": 4, "category": "writing", "turns": ["write abc", "now shorter"]},
            {"question_id": 5, "category": "writing", "turns": ["write xyz", "again"]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_auto_draft_is_the_default_draft_or_none(pair, capsys, monkeypatch):
    """--draft auto (the default): the built-in draft if it has the target's tokenizer, else target-only with one
    notice line, never an error."""
    import castspec.api as api

    target, draft, other = pair
    monkeypatch.setattr(api, "DEFAULT_DRAFT", draft)
    assert api.resolve_draft(target, "auto") == draft
    assert api.resolve_draft(target, "some-model") == "some-model"
    code, out, err = run(capsys, "generate", "--target", other, "--policy", "chain:gamma=3", "--prompt", "zyx zyx zyx",
                         "--max-new-tokens", "6", "--json", "--compare")
    assert code == 0, err
    assert "another tokenizer" in err and "speculating without a draft model" in err
    assert json.loads(out)["ar"]["identical"] is True


def test_generate_with_suffix_candidates_equals_ar(pair, capsys):
    target, draft, _ = pair
    for window in ("0", "3"):
        code, out, err = run(capsys, "generate", "--target", target, "--draft", draft, "--suffix", "--policy",
                             "chain:gamma=3", "--prompt", "hello hello hello", "--max-new-tokens", "10", "--json",
                             "--compare", "--draft-window", window)
        assert code == 0, err
        assert json.loads(out)["ar"]["identical"] is True
    code, _, err = run(capsys, "bench", "--target", target, "--draft", draft, "--suffix")
    assert code == 2 and "cast+suffix" in err


def test_bench_target_only_methods(pair, capsys, tmp_path, monkeypatch):
    """`suffix` (cast over suffix-drafter trees, no draft model) and `cast+suffix` (merged with the draft model's)
    equal ar; `hf-pld` (stock prompt lookup) runs."""
    monkeypatch.setenv("CASTSPEC_HOME", str(tmp_path / "home"))  # its quick cost table stays out of the user's cache
    target, draft, _ = pair
    questions = _spec_bench_file(tmp_path / "question.jsonl")
    out = tmp_path / "out"
    code, _, err = run(capsys, "bench", "--target", target, "--draft", draft, "--dataset", f"spec-bench:{questions}:qa",
                       "--num-prompts", "2", "--methods",
                       "ar,hf-pld,suffix,suffix:chain:gamma=3,cast+suffix,cast+suffix@window=4",
                       "--max-new-tokens", "6", "--out", str(out))
    assert code == 0, err
    summary = json.loads((out / "results.json").read_text())["by_batch_size"]["1"]["summary"]
    windowed = ("suffix", "suffix:chain:gamma=3", "cast+suffix", "cast+suffix@window=4")
    assert set(summary) == {"ar", "hf-pld", *windowed}
    for method in windowed:
        assert summary[method]["failed"] == [] and summary[method]["identical_to_ar"] == 1.0, method
    for bad in ("cast@window=0", "cast@window=x"):
        code, _, err = run(capsys, "bench", "--target", target, "--methods", f"ar,{bad}")
        assert code == 2 and "@window=N" in err and err.count("\n") == 1, err
    code, _, err = run(capsys, "bench", "--target", target, "--draft-window", "8")
    assert code == 2 and "cast@window=256" in err


def test_bench_tasks_batches_and_resume(pair, capsys, tmp_path):
    target, draft, _ = pair
    questions = _spec_bench_file(tmp_path / "question.jsonl")
    out = tmp_path / "out"
    argv = ["bench", "--target", target, "--draft", draft, "--dataset", f"spec-bench:{questions}:qa",
            "--dataset", f"spec-bench:{questions}:mt-bench", "--num-prompts", "2", "--batch-size", "1,2",
            "--methods", "ar,hf,hf-assisted,chain:gamma=2", "--max-new-tokens", "5", "--out", str(out)]
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and results["groups_done"] == results["groups_planned"] == 6  # 2x2 at B=1, 1+1 at B=2
    assert set(results["by_batch_size"]) == {"1", "2"}
    single, batched = results["by_batch_size"]["1"], results["by_batch_size"]["2"]
    assert set(single["by_task"]) == {"qa", "mt-bench"}
    assert "hf-assisted" in single["summary"] and "hf-assisted" not in batched["summary"]  # batch 1 only
    for part in (single, batched):
        for method, entry in part["summary"].items():
            assert entry["failed"] == [], method
            assert entry["prompts"] == 4 and entry["tokens_per_s"] > 0
            assert entry["peak_rss_mb"] > 0
    mt = next(r for r in results["records"] if r["task"] == "mt-bench" and r["batch_size"] == 2)
    assert [len(t) for t in mt["methods"]["ar"]["turn_tokens"]] == [2, 2]  # both turns, for both rows
    assert batched["summary"]["chain:gamma=2"]["mean_verified_nodes"] > 0
    chain = single["summary"]["chain:gamma=2"]  # the decode phase on its own, prefill left out
    assert chain["decode_speedup_vs_ar"] > 0 and 0 <= chain["outside_decode_share"] < 1
    assert chain["decode_tokens_per_s"] > chain["tokens_per_s"]
    assert 0 < chain["prefill_s"] <= chain["wall_s"] - chain["draft_s"] - chain["verify_s"] + 0.005  # (rounding)
    for name in ("results.md", "speedup.png", "speedup_by_task.png", "batch_sizes.png", "accept_hist.png"):
        assert (out / name).stat().st_size > 100, name
    assert "B=2" in (out / "results.md").read_text()

    # an interrupted run: drop the last measured group, then resume -> only that group is measured again
    log = out / "records.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:-1]) + "\n")
    code, _, err = run(capsys, *argv, "--resume")
    assert code == 0, err
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["groups_done"] == 6 and len(resumed["sessions"]) == 2
    assert [r["group"] for r in resumed["records"]] == [r["group"] for r in results["records"]]
    assert [r["session"] for r in resumed["records"]] == [0] * 5 + [1]  # which session measured each group
    report = (out / "results.md").read_text()
    assert "| 2 |" in report and resumed["environment"]["cpu"] in report  # the sessions table with each host

    changed = [("6" if a == "5" else a) for a in argv]  # --max-new-tokens 6: different settings, refused
    code, _, err = run(capsys, *changed, "--resume")
    assert code == 2 and "different settings" in err

    # --report-only re-renders the report from the records alone, keeping the measuring command
    (out / "results.md").unlink()
    code, _, err = run(capsys, *argv, "--report-only")
    assert code == 0, err
    rendered = json.loads((out / "results.json").read_text())
    assert rendered["records"] == resumed["records"] and rendered["complete"]
    assert rendered["command"] == resumed["command"] and "--report-only" not in rendered["command"]
    assert (out / "results.md").read_text() == report
    code, _, err = run(capsys, *changed, "--report-only")
    assert code == 2 and "different settings" in err
    code, _, err = run(capsys, *argv[:-1], str(tmp_path / "nothing-here"), "--report-only")
    assert code == 2 and "no records.jsonl" in err


def test_bench_records_the_whole_batch_not_sequence_0(pair):
    """At B = 2, row 0 ("m") ends at its first token (EOS) while row 1 runs on: the record must hold the batch's
    steps and times, not row 0's (which took part in no step at all)."""
    from castspec.bench.runner import BenchConfig, MethodRunner

    target, draft, _ = pair
    runner = MethodRunner(BenchConfig(target=target, draft=draft, methods=["chain:gamma=2"]))
    short, long = (runner.tokenizer(text)["input_ids"] for text in ("m", "hello world"))
    rec = runner.run("chain:gamma=2", [short, long], 8)
    assert [len(tokens) for tokens in rec["token_ids"]] == [1, 8]
    assert rec["steps"] >= 4  # the longest row's steps (8 tokens, at most 3 per chain step)
    assert rec["prefill_s"] > 0 and rec["draft_s"] > 0 and rec["verify_s"] > 0
    assert rec["prefill_s"] + rec["draft_s"] + rec["verify_s"] <= rec["wall_s"]  # the call's wall, not row 0's


def test_chat_answers_each_line_reusing_the_conversation_and_resets(pair, capsys, monkeypatch):
    """Two turns, a reset, a third: the second turn prefills only what it adds (its stats line says how many prompt
    tokens it reused), its answer is plain greedy decoding of the whole conversation, and after /reset the
    conversation starts over (the same first answer)."""
    import io

    from castspec.api import load_generator

    target, draft, _ = pair
    monkeypatch.setattr("sys.stdin", io.StringIO("hello world\nand more\n/reset\nhello world\n/exit\nnever read\n"))
    code, out, err = run(capsys, "chat", "--target", target, "--draft", draft, "--policy", "chain:gamma=3",
                         "--max-new-tokens", "8")
    assert code == 0, err
    stats = [line for line in err.splitlines() if line.startswith("[")]
    assert len(stats) == 3
    reused = [int(re.search(r"(\d+) reused", line).group(1)) for line in stats]
    assert reused[0] == 0 and reused[1] > 0 and reused[2] > 0  # after /reset: the first turn's prompt is cached too
    answers = out.split("\n")[:3]
    assert answers[0] == answers[2]  # the same first turn after the reset
    plain = load_generator(target, None, "ar")
    first = [{"role": "user", "content": "hello world"}]
    assert plain.generate(plain.encode_conversation(first), max_new_tokens=8).text == answers[0]
    second = first + [{"role": "assistant", "content": answers[0]}, {"role": "user", "content": "and more"}]
    assert plain.generate(plain.encode_conversation(second), max_new_tokens=8).text == answers[1]


def test_chat_reports_a_turn_that_does_not_fit_and_goes_on(pair, capsys, monkeypatch):
    import io

    target, _, _ = pair
    monkeypatch.setattr("sys.stdin", io.StringIO("x" * 1100 + "\nhello\n"))
    code, out, err = run(capsys, "chat", "--target", target, "--draft", "none", "--policy", "ar",
                         "--max-new-tokens", "4")
    assert code == 0
    assert "castspec: error:" in err and "/reset starts over" in err
    assert sum(line.startswith("[") for line in err.splitlines()) == 1
