"""The `llama.cpp` bench method's plumbing, with a fake `llama_cpp` module (CI does not install llama-cpp-python):
records, summary, report rows, resume, clear errors; and the assembled-GGUF cache of packaged models."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import sys
import types

import numpy as np
import pytest
import torch

from castspec.bench.llamacpp import LlamaCppPlain
from castspec.errors import CastspecError
from tests.test_cli import _spec_bench_file, run, save_tiny


class FakeLlama:
    """Stands in for llama_cpp.Llama: greedy logits from the tiny saved target (recomputed over the whole sequence,
    float32), optionally with the token at generated position `flip_at` swapped for the runner-up."""

    model_dir: str = ""
    flip_at: int | None = None
    eos_at: int | None = None  # put all mass on EOS (id 2) at this generated position
    instances: list[FakeLlama] = []

    def __init__(self, model_path, **kwargs):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_path, self.kwargs = model_path, kwargs
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        if not kwargs.get("vocab_only"):
            self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).eval()
        self.tokens: list[int] = []
        self.prompts: list[list[int]] = []
        self.evals = 0
        self.prompt_evals: list[int] = []  # tokens each prompt ran (a reused prefix not counted)
        self._fresh = True
        self.closed = False
        self.ctx = self
        self._prompt_len = 0
        FakeLlama.instances.append(self)

    def tokenize(self, text: bytes, add_bos=True, special=False):
        return self.tokenizer(text.decode())["input_ids"]

    def detokenize(self, tokens, special=False):
        return self.tokenizer.decode(tokens).encode()

    def n_vocab(self):
        return self.model.config.vocab_size

    def reset(self):
        self.tokens = []
        self._fresh = True

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @n_tokens.setter
    def n_tokens(self, keep: int) -> None:  # as llama.cpp's: the next eval drops the cache past `keep`
        self.tokens = self.tokens[:keep]
        self._fresh = True

    def eval(self, tokens):
        if self._fresh:  # a prompt: what the cache kept plus these
            self.prompts.append(self.tokens + list(tokens))
            self._prompt_len = len(self.prompts[-1])
            self.prompt_evals.append(len(tokens))
            self._fresh = False
        self.tokens += list(tokens)
        self.evals += 1
        with torch.no_grad():
            logits = self.model(torch.tensor([self.tokens])).logits[0, -1].float().numpy().copy()
        position = len(self.tokens) - self._prompt_len  # index of the token these logits choose
        if position == self.flip_at:
            first = int(logits.argmax())
            logits[first] = -np.inf
            logits[int(logits.argmax())] = 1e9
        if position == self.eos_at:
            logits[2] = 1e9
        self.logits = logits.astype(np.float32)

    def close(self):
        self.closed = True


def fake_module() -> types.ModuleType:
    module = types.ModuleType("llama_cpp")
    module.__version__ = "0.0.0-fake"
    module.Llama = FakeLlama
    module.llama_get_logits_ith = lambda ctx, i: ctx.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    module.llama_print_system_info = lambda: b"CPU : FAKE = 1 |"
    return module


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    target = save_tiny(root / "target", seed=0)
    draft = save_tiny(root / "draft", seed=0, layers=1)
    gguf = root / "target.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))  # the fake never reads it; the method checks it is a GGUF file
    return target, draft, str(gguf)


@pytest.fixture
def fake_llama(monkeypatch, models):
    monkeypatch.setitem(sys.modules, "llama_cpp", fake_module())
    monkeypatch.setattr(FakeLlama, "model_dir", models[0])
    monkeypatch.setattr(FakeLlama, "flip_at", None)
    monkeypatch.setattr(FakeLlama, "eos_at", None)
    monkeypatch.setattr(FakeLlama, "instances", [])
    return FakeLlama


def test_bench_llamacpp_records_report_and_resume(models, fake_llama, capsys, tmp_path):
    target, draft, gguf = models
    questions = _spec_bench_file(tmp_path / "question.jsonl")
    out = tmp_path / "out"
    argv = ["bench", "--target", target, "--draft", draft, "--gguf", gguf, "--dataset", f"spec-bench:{questions}:qa",
            "--dataset", f"spec-bench:{questions}:mt-bench", "--num-prompts", "2", "--batch-size", "1,2",
            "--methods", "ar,llama.cpp,chain:gamma=2", "--max-new-tokens", "6", "--threads", "1", "--out", str(out)]
    code, printed, err = run(capsys, *argv)
    assert code == 0, err
    [llm] = fake_llama.instances  # loaded once per process, freed at the end, the bench's threads
    assert llm.closed and llm.model_path == gguf
    assert llm.kwargs["n_threads"] == llm.kwargs["n_threads_batch"] == torch.get_num_threads() == 1
    results = json.loads((out / "results.json").read_text())
    assert results["complete"]
    single, batched = results["by_batch_size"]["1"], results["by_batch_size"]["2"]
    assert "llama.cpp" in single["summary"] and "llama.cpp" not in batched["summary"]  # batch 1 only
    skipped = [r["methods"]["llama.cpp"] for r in results["records"] if r["batch_size"] == 2]
    assert skipped and all("batch size 1 only" in rec["skipped"] for rec in skipped)

    records = [r for r in results["records"] if r["batch_size"] == 1]
    assert len(records) == 4
    prompts_seen = iter(llm.prompts[1:])  # the first is the warm-up
    for record in records:
        rec, ar = record["methods"]["llama.cpp"], record["methods"]["ar"]
        assert rec["prompt_tokens"] == ar["prompt_tokens"]  # the same prompt ids, turn by turn
        for turn_tokens in rec["prompt_tokens"][0]:
            assert len(next(prompts_seen)) == turn_tokens
        assert rec["token_ids"] == ar["token_ids"]  # the fake computes what ar computes
        assert rec["identical_to_ar"] == [True] and rec["divergences"] == []
        assert all(n <= 6 for n in rec["turn_tokens"][0])
        assert rec["steps"] == rec["new_tokens"] - len(rec["turn_tokens"][0])  # one forward per token after prefill
        assert 0 < rec["prefill_s"] and 0 < rec["verify_s"] and rec["draft_s"] == 0
        assert rec["prefill_s"] + rec["verify_s"] <= rec["wall_s"] + 1e-6
        assert len(rec["load_1m"]) == len(rec["busy_cores"]) == len(rec["turn_tokens"][0])  # the machine's load
        assert all(0 <= busy <= 2 * (os.cpu_count() or 1) for busy in rec["busy_cores"])
    mt = next(r for r in records if r["task"] == "mt-bench")
    assert len(mt["methods"]["llama.cpp"]["turn_tokens"][0]) == 2  # both turns, on its own earlier answer
    for record in records:  # only a conversation's later turn reuses, its own earlier one: never another method's
        for rec in record["methods"].values():
            first, *later = rec["cached_tokens"]
            assert first == 0 and len(later) == (record["task"] == "mt-bench")
            assert all(0 < n < turn for n, turn in zip(later, rec["prompt_tokens"][0][1:], strict=True))

    entry = single["summary"]["llama.cpp"]
    assert entry["failed"] == [] and entry["prompts"] == 4
    assert entry["mean_accept_len"] == 1.0 and entry["identical_to_ar"] == 1.0
    assert entry["speedup_vs_ar"] > 0 and entry["decode_speedup_vs_ar"] > 0
    assert entry["decode_tokens_per_s"] > entry["tokens_per_s"] > 0
    env = results["environment"]
    assert env["llamacpp"]["llama_cpp_python"] == "0.0.0-fake" and env["llamacpp"]["threads"] == 1
    assert env["llamacpp"]["gguf"]["path"].endswith("target.gguf") and len(env["load_avg"]) == 3

    report = (out / "results.md").read_text()
    assert "| `llama.cpp` |" in report and "tokens/s decode only" in report and "load average at start" in report
    assert "cores busy on average just before its runs" in report
    assert "| `llama.cpp` |" in printed
    assert (out / "speedup.png").stat().st_size > 100

    # resume: the last group again, with llama.cpp loaded again in the new process; another --gguf is refused
    log = out / "records.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:-1]) + "\n")
    code, _, err = run(capsys, *argv, "--resume")
    assert code == 0, err
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["groups_done"] == results["groups_done"] and len(resumed["sessions"]) == 2
    assert len(fake_llama.instances) == 2
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF" + bytes(8))
    changed = [str(other) if a == gguf else a for a in argv]
    code, _, err = run(capsys, *changed, "--resume")
    assert code == 2 and "different settings (gguf)" in err
    code, _, err = run(capsys, *argv, "--report-only")
    assert code == 0, err


def test_llamacpp_differences_are_reported_not_failed(models, fake_llama, capsys, tmp_path):
    target, draft, gguf = models
    fake_llama.flip_at = 2
    out = tmp_path / "out"
    code, _, err = run(capsys, "bench", "--target", target, "--gguf", gguf, "--num-prompts", "2",
                       "--methods", "ar,llama.cpp", "--max-new-tokens", "5", "--out", str(out))
    assert code == 0, err
    summary = json.loads((out / "results.json").read_text())["summary"]["llama.cpp"]
    assert summary["failed"] == [] and summary["identical_to_ar"] == 0.0
    assert [d["index"] for d in summary["divergences"]] == [2, 2]  # the first differing token
    assert all(d["logit_gap"] > 0 for d in summary["divergences"])  # our target prefers ar's token there
    report = (out / "results.md").read_text()
    assert "| 0% |" in report
    assert report.count("expected for llama.cpp: different arithmetic, not an exactness failure") == 2


def test_llamacpp_stops_at_eos_and_budget(models, fake_llama, monkeypatch):
    fake_llama.eos_at = 3
    monkeypatch.setattr("castspec.bench.llamacpp._CTX_STEP", 16)
    runner = LlamaCppPlain({"path": models[2]}, threads=1, n_ctx=16)
    rec = runner.generate([5, 6, 7], max_new_tokens=10, eos_ids={2})
    assert rec["token_ids"][0][-1] == 2 and rec["new_tokens"] == 4 and rec["steps"] == 3  # EOS kept, as ar does
    rec = runner.generate([5, 6, 7], max_new_tokens=2, eos_ids={2})
    assert rec["new_tokens"] == 2 and rec["steps"] == 1
    rec = runner.generate(list(range(3, 23)), max_new_tokens=2, eos_ids={2})  # 20 + 2 tokens: the context grows
    assert rec["new_tokens"] == 2 and runner.n_ctx == 32
    assert fake_llama.instances[0].closed and len(fake_llama.instances) == 2
    runner.close()
    assert fake_llama.instances[1].closed


def test_llamacpp_runs_only_what_a_prompt_adds_to_its_cache(models, fake_llama):
    """As llama-cpp-python's own `generate`: a prompt that starts with the tokens of the last call (its prompt and
    the tokens it fed back) runs only the rest, and decodes as it would from scratch."""
    runner = LlamaCppPlain({"path": models[2]}, threads=1)
    first = runner.generate([5, 6, 7, 8], max_new_tokens=4, eos_ids=set())["token_ids"][0]
    follow_up = [5, 6, 7, 8] + first + [9, 10]
    again = runner.generate(follow_up, max_new_tokens=4, eos_ids=set())["token_ids"][0]
    llm = fake_llama.instances[0]
    assert llm.prompt_evals == [4, 3] and llm.prompts[-1] == follow_up  # the last answer token, then 9 and 10
    runner.reuse_prefix = False
    assert runner.generate(follow_up, max_new_tokens=4, eos_ids=set())["token_ids"][0] == again
    assert llm.prompt_evals[-1] == len(follow_up)
    runner.close()


BENCH = ["bench", "--target", "{target}", "--out", "{tmp}/out", "--max-new-tokens", "4"]


@pytest.mark.parametrize("installed, argv, message", [
    (False, BENCH + ["--methods", "ar,llama.cpp"], "method llama.cpp needs llama-cpp-python, which is not installed: "
                                                    "pip install 'castspec[llamacpp]'"),
    (True, BENCH + ["--methods", "ar,llama.cpp"], "is not a built-in model"),
    (True, BENCH + ["--methods", "ar,llama.cpp", "--gguf", "{tmp}/nothing.gguf"], "--gguf {tmp}/nothing.gguf: no such"),
    (True, BENCH + ["--methods", "ar,llama.cpp", "--gguf", "{target}/config.json"], "not a GGUF file"),
    (True, BENCH + ["--methods", "ar,llama.cpp", "--gguf", "{gguf}", "--temperature", "0.7"], "greedily only"),
    (True, BENCH + ["--methods", "ar,cast", "--gguf", "{gguf}"], "--draft-gguf and --llama-speculative are for"),
])
def test_bad_llamacpp_input_is_one_clear_error_line(models, monkeypatch, capsys, tmp_path, installed, argv, message):
    """Exit code 2, one `castspec: error:` line, before any model is loaded."""
    target, _, gguf = models
    monkeypatch.setitem(sys.modules, "llama_cpp", fake_module() if installed else None)  # None: not importable
    argv = [a.format(target=target, gguf=gguf, tmp=tmp_path) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2, err
    assert err.strip().splitlines() == [f"castspec: error: {err.strip().split('error: ', 1)[1]}"]
    assert message.format(tmp=tmp_path) in err and "Traceback" not in err and out == ""


def test_help_lists_the_method(capsys):
    with pytest.raises(SystemExit):
        run(capsys, "bench", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "llama.cpp (plain greedy decoding of the target's GGUF" in text and "--gguf" in text


# --- the assembled GGUF of a packaged model --------------------------------------------------------------------------


def test_ensure_gguf_assembles_once_and_checks_the_cache(tmp_path, monkeypatch):
    from castspec.models import packaged

    parts = [b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 5]
    files = []
    for i, data in enumerate(parts):
        files.append(tmp_path / f"part{i}")
        files[-1].write_bytes(data)
    spec = packaged.PackagedModel(
        name="toy", description="toy", source="chunks", packages=("toy-1", "toy-2", "toy-3"), version="1.0",
        modules=("toy_1", "toy_2", "toy_3"), gguf_name="toy.gguf", gguf_size=sum(map(len, parts)),
        architecture="Qwen2ForCausalLM", minutes="1 s", fp32_gb=0.0)
    monkeypatch.setenv("CASTSPEC_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(packaged.BUILTIN_MODELS, "toy", spec)
    monkeypatch.setattr(packaged, "_installed_versions", lambda s: dict.fromkeys(s.packages, "1.0"))
    monkeypatch.setattr(packaged, "_chunk_files", lambda s: list(zip(s.packages, files, strict=True)))
    records = {str(f): (hashlib.sha256(d).hexdigest(), len(d)) for f, d in zip(files, parts, strict=True)}
    monkeypatch.setattr(packaged, "_record_entry", lambda dist, f: records[str(f)])

    path = packaged.ensure_gguf("toy")
    assert path == tmp_path / "home" / "gguf" / "toy.gguf" and path.read_bytes() == b"".join(parts)
    info = packaged.gguf_info("toy")
    assert info["sha256"] == hashlib.sha256(b"".join(parts)).hexdigest() and info["size"] == spec.gguf_size
    assert info["source_packages"] == {"toy-1": "1.0", "toy-2": "1.0", "toy-3": "1.0"}

    monkeypatch.setattr(packaged, "_assemble", lambda *a: pytest.fail("assembled twice"))
    assert packaged.ensure_gguf("toy") == path  # cached: size checked, nothing copied
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CastspecError, match="cached GGUF of model 'toy' is corrupt \\(100 bytes, expected 1786\\)"):
        packaged.ensure_gguf("toy")


def test_ensure_gguf_refuses_a_corrupt_chunk(tmp_path, monkeypatch):
    from castspec.models import packaged

    part = tmp_path / "part0"
    part.write_bytes(b"GGUF" + b"x" * 60)
    spec = packaged.PackagedModel(
        name="toy", description="toy", source="chunks", packages=("toy-1",), version="1.0", modules=("toy_1",),
        gguf_name="toy.gguf", gguf_size=64, architecture="Qwen2ForCausalLM", minutes="1 s", fp32_gb=0.0)
    monkeypatch.setenv("CASTSPEC_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(packaged.BUILTIN_MODELS, "toy", spec)
    monkeypatch.setattr(packaged, "_installed_versions", lambda s: {"toy-1": "1.0"})
    monkeypatch.setattr(packaged, "_chunk_files", lambda s: [("toy-1", part)])
    monkeypatch.setattr(packaged, "_record_entry", lambda dist, f: ("0" * 64, 64))  # pip recorded another hash
    with pytest.raises(CastspecError, match="is corrupt \\(sha256 differs"):
        packaged.ensure_gguf("toy")
    assert not (tmp_path / "home" / "gguf" / "toy.gguf").exists()
    assert not list((tmp_path / "home" / "gguf").glob(".tmp-*"))


# --- llama.cpp-spec: llama.cpp's own speculative decoding, through its binary -----------------------------------------

FAKE_BINARY = '''#!{python}
"""Stands in for llama-speculative-simple: echoes the prompt, "generates" the letter a, logs steps and times."""
import os, sys
args = sys.argv[1:]
if args == ["--version"]:
    print("version: 0 (fake)")
    sys.exit(0)
with open(os.environ["FAKE_SPEC_LOG"], "a") as log:
    log.write(repr(args) + "\\n")
flags = dict((args[i], args[i + 1]) for i in range(len(args) - 1)
             if args[i].startswith("-") and args[i] != "--no-escape")
n, k = int(flags["-n"]), int(flags["--spec-draft-n-max"])
eos_at = int(os.environ.get("FAKE_SPEC_EOS", "0"))
tokens = ["a"] * (eos_at or n + k)  # overshoots -n like the real one, unless it meets EOS
printed = "".join(tokens)
decoded = len(tokens) + (1 if eos_at else 0)
steps = [(min(k, decoded - i - 1), k) for i in range(0, decoded, k + 1)]
sys.stdout.write("\\n\\n" + flags["-p"] + printed + "\\n\\n")
for accepted, drafted in steps:
    last = 2 if eos_at else 4
    sys.stderr.write(f"0.00 D accepted {{accepted}}/{{drafted}} draft tokens, "
                     f"the last target token is: ({{last}})\\n")
sys.stderr.write("0.01 I encoded   12 tokens in    0.125 seconds, speed:   96.000 t/s\\n")
sys.stderr.write(f"0.02 I decoded {{decoded:4d}} tokens in    0.500 seconds, speed:    2.000 t/s\\n")
'''


@pytest.fixture
def fake_binary(tmp_path, monkeypatch):
    path = tmp_path / "llama-speculative-simple"
    path.write_text(FAKE_BINARY.format(python=sys.executable))
    path.chmod(0o755)
    monkeypatch.setenv("FAKE_SPEC_LOG", str(tmp_path / "calls.log"))
    monkeypatch.delenv("CASTSPEC_LLAMA_SPECULATIVE", raising=False)
    return path


def test_bench_llamacpp_spec(models, fake_llama, fake_binary, capsys, tmp_path):
    target, draft, gguf = models
    out = tmp_path / "out"
    code, _, err = run(capsys, "bench", "--target", target, "--draft", draft, "--gguf", gguf, "--draft-gguf", gguf,
                       "--llama-speculative", str(fake_binary), "--num-prompts", "2", "--max-new-tokens", "9",
                       "--methods", "ar,llama.cpp-spec:n=3,llama.cpp", "--out", str(out))
    assert code == 0, err
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert len(calls) == 3  # warm-up + 2 prompts, one process each
    argv = eval(calls[-1])  # noqa: S307 (our own fake's log)
    for flag, value in [("-m", gguf), ("-md", gguf), ("--spec-draft-n-max", "3"), ("-n", "8"), ("-t", "2"),
                        ("--temp", "0"), ("--spec-type", "draft-simple")]:
        assert argv[argv.index(flag) + 1] == (value if flag != "-t" else str(torch.get_num_threads())), flag
    results = json.loads((out / "results.json").read_text())
    record = results["records"][0]["methods"]["llama.cpp-spec:n=3"]
    assert record["token_ids"][0] == [FakeLlama(gguf).tokenizer("a")["input_ids"][0]] * 9  # cut at the budget
    assert record["new_tokens"] == 11 and record["overshoot"] == [2]  # what it decoded in the time it reports
    assert record["prefill_s"] == 0.125 and record["verify_s"] == 0.5 and record["wall_s"] == 0.625
    assert record["steps"] == 3 and record["accepted"] == [3, 3, 2] and record["depths"] == [3, 3, 3]
    entry = results["summary"]["llama.cpp-spec:n=3"]
    assert entry["failed"] == [] and entry["mean_accept_len"] == pytest.approx(11 / 3, abs=1e-3)
    assert entry["tokens_per_s"] == pytest.approx(22 / 1.25) and "identical_to_ar" in entry
    env = results["environment"]["llamacpp_spec"]["llama.cpp-spec:n=3"]
    assert env["version"] == "version: 0 (fake)" and env["spec_draft_n_max"] == 3
    report = (out / "results.md").read_text()
    assert "| `llama.cpp-spec:n=3` |" in report and "llama.cpp's own speculative decoding" in report
    assert "| `llama.cpp` |" in report  # both llama.cpp methods side by side


def test_bench_llamacpp_spec_draft_free(models, fake_llama, fake_binary, capsys, tmp_path):
    """type=ngram-*: llama.cpp speculates from the text itself, so it runs beside --draft none and is handed no
    draft model or draft threads."""
    target, _, gguf = models
    out = tmp_path / "out"
    code, _, err = run(capsys, "bench", "--target", target, "--draft", "none", "--gguf", gguf,
                       "--llama-speculative", str(fake_binary), "--num-prompts", "1", "--max-new-tokens", "9",
                       "--methods", "ar,llama.cpp-spec:n=6/type=ngram-simple/key=3", "--out", str(out))
    assert code == 0, err
    argv = eval((tmp_path / "calls.log").read_text().splitlines()[-1])  # noqa: S307 (our own fake's log)
    assert argv[argv.index("--spec-type") + 1] == "ngram-simple" and argv[argv.index("--spec-draft-n-max") + 1] == "6"
    assert argv[argv.index("--spec-ngram-simple-size-m") + 1] == "6"  # its own cap: it ignores the draft max
    assert argv[argv.index("--spec-ngram-simple-size-n") + 1] == "3"
    assert "-md" not in argv and "-td" not in argv and "-tbd" not in argv
    results = json.loads((out / "results.json").read_text())
    env = results["environment"]["llamacpp_spec"]["llama.cpp-spec:n=6,type=ngram-simple,key=3"]
    assert env["spec_type"] == "ngram-simple" and env["draft_gguf"] is None and env["ngram_key"] == 3
    assert "no draft model: --spec-type ngram-simple, candidates from the text itself, key of 3 tokens" in (
        out / "results.md").read_text()


@pytest.mark.parametrize("method, settings", [
    ("llama.cpp-spec", (4, "draft-simple", None)), ("llama.cpp-spec:n=8", (8, "draft-simple", None)),
    ("llama.cpp-spec:n=8,type=ngram-simple", (8, "ngram-simple", None)),
    ("llama.cpp-spec:type=ngram-map-k,key=3", (4, "ngram-map-k", 3)),
    ("llama.cpp-spec:", None), ("llama.cpp-spec:n=0", None), ("llama.cpp-spec:n=3,k=2", None),
    ("llama.cpp-spec:type=ngram-mod", None), ("llama.cpp-specs", None), ("llama.cpp-spec:n=4,key=3", None),
    ("llama.cpp-spec:type=ngram-simple,key=0", None),
])
def test_llamacpp_spec_settings(method, settings):
    from castspec.bench.llamacpp import spec_settings

    if settings is None:
        with pytest.raises(CastspecError, match="bad method"):
            spec_settings(method)
    else:
        assert spec_settings(method) == settings


def test_llamacpp_spec_stops_at_eos(models, fake_llama, fake_binary, monkeypatch):
    from castspec.bench.llamacpp import LlamaCppSpec

    monkeypatch.setenv("FAKE_SPEC_EOS", "4")
    spec = LlamaCppSpec(str(fake_binary), {"path": models[2]}, {"path": models[2]}, threads=1, n_max=2)
    prompt = spec.vocab.tokenize(b"hello")
    rec = spec.generate(prompt, max_new_tokens=20, eos_ids={2})
    a = spec.vocab.tokenize(b"a")[0]
    assert rec["token_ids"] == [[a] * 4 + [2]] and rec["new_tokens"] == 5  # the unprinted EOS id from the step log
    assert rec["overshoot"] == [0]
    monkeypatch.setattr(spec.vocab, "tokenize", lambda *args, **kwargs: [7])  # text that tokenizes differently
    with pytest.raises(CastspecError, match="does not tokenize back to the same ids"):
        spec.generate(prompt, max_new_tokens=4, eos_ids={2})


@pytest.mark.parametrize("argv, message", [
    (["--methods", "ar,llama.cpp-spec:k=3"], "bad method 'llama.cpp-spec:k=3': write llama.cpp-spec:n=N"),
    (["--methods", "ar,llama.cpp-spec:n=0"], "with N >= 1 draft tokens"),
    (["--methods", "ar,llama.cpp-spec"], "needs llama.cpp's llama-speculative-simple binary"),
    (["--methods", "ar,llama.cpp-spec", "--llama-speculative", "{tmp}/none"], "not an executable file"),
    (["--methods", "ar,llama.cpp-spec", "--llama-speculative", "{binary}"], "--draft {draft} is not a built-in"),
    (["--methods", "ar,llama.cpp-spec", "--llama-speculative", "{binary}", "--draft-gguf", "{tmp}/x.gguf"],
     "--draft-gguf {tmp}/x.gguf: no such file"),
    (["--methods", "llama.cpp,llama.cpp-spec:n=4", "--llama-speculative", "{binary}", "--draft", "none"],
     "llama.cpp-spec:n=4 drafts with a draft model, and this run has none (--draft none)"),
])
def test_bad_llamacpp_spec_input(models, fake_llama, fake_binary, monkeypatch, capsys, tmp_path, argv, message):
    target, draft, gguf = models
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no llama-speculative-simple on PATH
    fill = dict(tmp=tmp_path, binary=fake_binary, draft=draft)
    argv = ["bench", "--target", target, "--draft", draft, "--gguf", gguf, "--out", str(tmp_path / "out")] + [
        a.format(**fill) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message.format(**fill) in err, err


def test_llamacpp_spec_checks_the_draft_auto_decided(models, fake_llama, fake_binary, monkeypatch, capsys, tmp_path):
    """--draft auto (the default) is decided before the draft's GGUF is looked for: the check names the model
    'auto' stands for, not 'auto' (which once failed as "not a built-in model" for the built-in pair)."""
    import castspec.api

    target, draft, gguf = models
    monkeypatch.setattr(castspec.api, "resolve_draft", lambda t, d: draft if d == "auto" else d)
    code, _, err = run(capsys, "bench", "--target", target, "--gguf", gguf, "--out", str(tmp_path / "out"),
                       "--methods", "ar,llama.cpp-spec", "--llama-speculative", str(fake_binary))
    assert code == 2 and f"--draft {draft} is not a built-in" in err and "--draft auto" not in err, err
