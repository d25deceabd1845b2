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
