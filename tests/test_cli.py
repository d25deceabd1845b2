"""The command line: a working run on tiny saved models, and a clear error with exit code 2 for bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen2Tokenizer

from castspec.cli import main
from tests.conftest import tiny_model


def save_tiny(path, seed=0, layers=2, alphabet="abcdefghijklmnopqrstuvwxyz0123456789"):
    """A tiny Qwen2 model with a real (byte-level BPE, one token per character) tokenizer, saved as a HF dir."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for char in "Ġ" + alphabet:
        vocab[char] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                               unk_token=None)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(path)
    tiny_model("qwen2", seed=seed, layers=layers, sharpen=4.0).to(torch.float32).save_pretrained(path)
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


def test_generate_streams_text(pair, capsys):
    target, draft, _ = pair
    code, out, err = run(capsys, "generate", "--target", target, "--draft", draft, "--policy", "chain:gamma=2",
                         "--prompt", "hello", "--max-new-tokens", "5")
    assert code == 0, err
    assert out.strip()
    assert "tok/s" in err


@pytest.mark.parametrize("argv, message", [
    (["--target", "no-such-model"], "unknown model"),
    (["--target", "/nonexistent/dir"], "unknown model"),
    (["--prompt", "   "], "prompt is empty"),
    (["--prompt", "ab " * 1000], "exceeds the model's context"),
    (["--policy", "nonsense"], "unknown policy"),
    (["--policy", "chain:gamma=x=1"], "bad parameters"),
    (["--policy", "cast:mode=fast"], "mode must be"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "cannot read --prompt-file"),
    (["--temperature", "-1"], "temperature must be"),
    (["--top-p", "0"], "top_p must be"),
    (["--batch-size", "2"], "--batch-size needs --prompt-file"),
])
def test_bad_input_is_a_clear_error(pair, capsys, argv, message):
    target, draft, _ = pair
    base = ["generate", "--target", target, "--draft", draft, "--max-new-tokens", "4", "--policy", "chain"]
    if "--prompt-file" not in argv:
        base += ["--prompt", "hello"]
    code, _, err = run(capsys, *base, *argv)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


def test_mismatched_vocabulary_is_refused(pair, capsys):
    target, _, other = pair
    code, _, err = run(capsys, "generate", "--target", target, "--draft", other, "--prompt", "hi", "--policy", "chain")
    assert code == 2
    assert "tokenizer" in err or "vocabulary" in err


@pytest.mark.parametrize("value", ["0", "-3", "ten"])
def test_max_new_tokens_must_be_positive(pair, capsys, value):
    target, draft, _ = pair
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--target", target, "--draft", draft, "--prompt", "hi", "--max-new-tokens", value])
    assert exc.value.code == 2
    assert "--max-new-tokens" in capsys.readouterr().err


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


def _spec_bench_file(path):
    rows = [{"question_id": 1, "category": "qa", "turns": ["who is x"]},
            {"question_id": 2, "category": "qa", "turns": ["what is y"]},
            {"question_id": 3, "category": "qa", "turns": ["why z"]},
            {"question_id": 4, "category": "writing", "turns": ["write abc", "now shorter"]},
            {"question_id": 5, "category": "writing", "turns": ["write xyz", "again"]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


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


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "0"], "--batch-size"),
    (["--dataset", "squad"], "unknown dataset"),
    (["--methods", "ar,eagle3"], "eagle3"),
])
def test_bench_bad_arguments(pair, capsys, tmp_path, extra, message):
    target, draft, _ = pair
    code, _, err = run(capsys, "bench", "--target", target, "--draft", draft, "--out", str(tmp_path), *extra)
    assert code == 2
    assert message in err
