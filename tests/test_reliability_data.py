"""Issue #14, data and generation: no silent fallback, no silent loss, no traceback.

Each test here fails on the code before the fix: a corpus passed over without a word, a
smaller BPE vocabulary, undecodable bytes replaced silently, `neuroplastic data` blind to a
split that is on disk, 25+ s of retries for an unreachable Hub, generate tracebacks, and an
ignored --embedding-dim on a neurogen resume.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from neuroplastic.cli import main
from neuroplastic.config import DataConfig
from neuroplastic.data import registry
from neuroplastic.data.sources import DataWarning, load_documents
from neuroplastic.errors import UserError
from tests.conftest import ROOT, SAMPLE_TEXT, run_cli, tiny_overrides

WIKI = (
    " = Alpha = \n \n Alpha is the first letter of the Greek alphabet . \n"
    " = = History = = \n \n It came from the Phoenician letter aleph . \n"
    " = Beta = \n \n Beta is the second letter . \n"
)


@pytest.fixture
def isolated_data(tmp_path, monkeypatch):
    """Only ``tmp_path/data`` (and an empty cache) is searched for corpora; downloads are off."""
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(registry, "_REPO_ROOT", tmp_path / "repo")
    monkeypatch.setenv("NEUROPLASTIC_DATA", str(data))
    monkeypatch.setenv("NEUROPLASTIC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NEUROPLASTIC_OFFLINE", "1")
    return data


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- item 11: silent fallbacks ---------------------------------------------------------------
def test_curriculum_fallback_warns_and_the_banner_names_what_is_read(isolated_data):
    from neuroplastic.data.pipeline import prepare_stages

    cfg = DataConfig(source="synthetic", tokenizer="byte", data_dir="", max_chars=20_000)
    with pytest.warns(DataWarning) as record:
        staged = prepare_stages(cfg, ["wordnet|synthetic:definitions", "synthetic:explanations"])
    messages = [str(w.message) for w in record]
    assert len(messages) == 1, messages
    assert "wordnet is not on this machine" in messages[0]
    assert str(isolated_data.resolve()) in messages[0]  # where it looked
    assert "trains on synthetic:definitions instead" in messages[0]
    assert staged.description == (
        "synthetic curriculum synthetic:definitions (wordnet not found) -> synthetic:explanations"
    )
    # the stage keeps its name (curriculum state and checkpoints refer to it)
    assert set(staged.train) == {"wordnet|synthetic:definitions", "synthetic:explanations"}


def test_curriculum_fallback_names_a_split_that_is_here(isolated_data):
    from neuroplastic.data.pipeline import choose_stage_source

    (isolated_data / "wikitext2").mkdir()
    (isolated_data / "wikitext2" / "wiki.valid.tokens").write_text(WIKI, encoding="utf-8")
    with pytest.warns(DataWarning, match=r"present instead: wikitext2@valid\), so this stage trains on synthetic:dialogues"):
        assert choose_stage_source("wikitext2|synthetic:dialogues", DataConfig()) == "synthetic:dialogues"


def test_curriculum_uses_a_present_corpus_without_a_warning(isolated_data):
    from neuroplastic.data.pipeline import prepare_stages

    (isolated_data / "wikitext2").mkdir()
    (isolated_data / "wikitext2" / "wiki.valid.tokens").write_text(WIKI * 20, encoding="utf-8")
    cfg = DataConfig(source="synthetic", tokenizer="byte", data_dir="", max_chars=20_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        staged = prepare_stages(cfg, ["wikitext2@valid|synthetic:dialogues"])
    assert staged.description == "synthetic curriculum wikitext2@valid"


def test_missing_named_corpus_says_where_it_looked_and_how_to_get_it(isolated_data):
    with pytest.raises(UserError) as e:
        load_documents("wikitext2")
    msg = str(e.value)
    assert "wikitext2 is not in any data dir" in msg and str(isolated_data.resolve()) in msg
    assert "put wikitext2/wiki.train.raw under one of them" in msg
    assert "unset NEUROPLASTIC_OFFLINE" in msg


def test_a_bare_name_never_reads_another_split_and_name_at_split_does(isolated_data):
    (isolated_data / "wikitext2").mkdir()
    (isolated_data / "wikitext2" / "wiki.valid.tokens").write_text(WIKI, encoding="utf-8")
    with pytest.raises(UserError, match=r"its valid split is here: use wikitext2@valid"):
        load_documents("wikitext2")
    docs = load_documents("wikitext2@valid")
    assert [d.splitlines()[0].strip() for d in docs] == ["= Alpha =", "= Beta ="]
    with pytest.raises(UserError, match=r"no split 'dev'; use one of wikitext2@train, wikitext2@valid"):
        load_documents("wikitext2@dev")
    with pytest.raises(UserError, match="gsm8k has no named splits"):
        load_documents("gsm8k@test")


def test_data_command_reports_each_file_and_split_found(isolated_data, capsys):
    (isolated_data / "wikitext2").mkdir()
    valid = isolated_data / "wikitext2" / "wiki.valid.tokens"
    valid.write_text(WIKI, encoding="utf-8")
    (isolated_data / "gsm8k").mkdir()
    (isolated_data / "gsm8k" / "train.jsonl").write_text('{"question": "q", "answer": "a"}\n')

    row = next(r for r in registry.status() if r["name"] == "wikitext2")
    assert not row["available"]  # the train split (what `wikitext2` reads) is not here
    assert row["files"] == [{"split": "valid", "path": str(valid.resolve()), "size_bytes": len(WIKI)}]
    assert row["splits"] == ["train", "valid", "test"]

    assert main(["data"]) == 0
    out = capsys.readouterr().out
    wiki = next(ln for ln in out.splitlines() if ln.startswith("| wikitext2 "))
    assert "partial: valid" in wiki and str(valid.resolve()) in wiki
    assert any(ln.startswith("| wikitext2@valid ") and str(valid.resolve()) in ln for ln in out.splitlines())
    assert any(ln.startswith("| gsm8k ") and "train.jsonl" in ln for ln in out.splitlines())
    assert "| wikitext103     | no " in out


@pytest.mark.skipif(not (ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.valid.tokens").is_file(),
                    reason="no shared WikiText-2 validation file")
def test_data_command_sees_the_shared_wikitext2_validation_split(capsys):
    assert main(["data"]) == 0
    out = capsys.readouterr().out
    wiki = next(ln for ln in out.splitlines() if ln.startswith("| wikitext2 "))
    assert "| no " not in wiki and "valid" in wiki


def test_bpe_smaller_than_asked_warns_with_both_numbers():
    from neuroplastic.data.tokenizers import build_tokenizer

    texts = [SAMPLE_TEXT]
    with pytest.warns(DataWarning) as record:
        tok = build_tokenizer("bpe", lambda: iter(texts), 4096)
    assert tok.vocab_size < 4096
    msg = str(record[0].message)
    assert f"has {tok.vocab_size:,} tokens, not the 4,096 asked for" in msg
    assert f"({len(SAMPLE_TEXT):,} characters in 1 document)" in msg and "too small" in msg
    with warnings.catch_warnings():  # asking for what the text holds: no warning
        warnings.simplefilter("error", DataWarning)
        assert build_tokenizer("bpe", lambda: iter(texts), tok.vocab_size).vocab_size == tok.vocab_size


# -- item: latin-1 files ---------------------------------------------------------------------
def test_latin1_text_file_warns_with_file_and_count(tmp_path):
    p = tmp_path / "latin.txt"
    p.write_bytes("Café naïve résumé: déjà vu.".encode("latin-1"))  # 6 non-UTF-8 bytes
    with pytest.warns(DataWarning, match=r"latin\.txt is not valid UTF-8: 6 bytes could not be decoded"):
        docs = load_documents(str(p))
    assert docs == ["Caf\ufffd na\ufffdve r\ufffdsum\ufffd: d\ufffdj\ufffd vu."]


def test_latin1_jsonl_and_folder_warn_per_file(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.jsonl").write_bytes('{"text": "été"}\n{"text": "ok"}\n'.encode("latin-1"))
    (d / "b.txt").write_text("clean text", encoding="utf-8")
    with pytest.warns(DataWarning) as record:
        docs = load_documents(str(d))
    assert docs == ["\ufffdt\ufffd", "ok", "clean text"]
    assert [str(w.message).split(" is not")[0] for w in record] == [str(d / "a.jsonl")]
    assert "2 bytes could not be decoded" in str(record[0].message)


def test_utf8_file_does_not_warn(tmp_path):
    p = tmp_path / "u.txt"
    p.write_text("Café naïve – \ufffd already there", encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        assert load_documents(str(p)) == ["Café naïve – \ufffd already there"]


# -- item: hf: datasets offline -----------------------------------------------------------------
def _hf_subprocess(env_extra: dict, tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HTTP", "http", "ALL_PROXY", "all_proxy"))}
    env.update(env_extra)
    env["HF_HOME"] = str(tmp_path / "hf-home")  # an empty cache: nothing is there
    env["PYTHONPATH"] = str(ROOT / "src")
    code = (
        "import sys, time\n"
        "from neuroplastic.data.sources import load_documents\n"
        "from neuroplastic.errors import UserError\n"
        "t = time.time()\n"
        "try:\n"
        "    load_documents('hf:someone/some-dataset@validation', max_chars=100)\n"
        "except UserError as e:\n"
        "    print(f'{time.time() - t:.2f}'); print(e); sys.exit(2)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)


@pytest.mark.parametrize("env, reason", [
    ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
    ({"HF_DATASETS_OFFLINE": "1"}, "HF_DATASETS_OFFLINE is set"),
    ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "no connection to 127.0.0.1:9"),  # a closed port: no network
])
def test_hf_dataset_offline_is_one_fast_sentence(tmp_path, env, reason):
    r = _hf_subprocess(env, tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr[-2000:])
    seconds, message = r.stdout.strip().splitlines()
    assert float(seconds) < 8, seconds  # before: ~28 s of retries against the closed port
    assert "'someone/some-dataset' is not in the local cache and the Hub cannot be reached" in message
    assert reason in message and "give a local copy" in message


def test_hf_offline_mode_is_switched_back_after_the_call(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants as hub_constants

    from neuroplastic.data import sources

    monkeypatch.setattr(sources, "hub_offline_reason", lambda: "test: no network")
    before = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    t = time.time()
    with pytest.raises(UserError, match=r"Hub cannot be reached \(test: no network\)"):
        load_documents("hf:someone/some-dataset", max_chars=10)
    assert time.time() - t < 5
    assert (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE) == before


def test_hub_probe_reports_a_closed_port_quickly(monkeypatch):
    from neuroplastic.data.sources import hub_offline_reason

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    t = time.time()
    assert hub_offline_reason().startswith("no connection to 127.0.0.1:9")
    assert time.time() - t < 4
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_offline_reason() == "HF_HUB_OFFLINE is set"


# -- item: generate ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    data = root / "corpus.txt"
    data.write_text(SAMPLE_TEXT, encoding="utf-8")
    out = root / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "tiny", *tiny_overrides(data, out, **{"train.max_steps": 4})]) == 0
    finally:
        torch.set_num_threads(n)
    return out


@pytest.mark.parametrize("flags, needle", [
    (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--top-p", "nan"], "--top-p must be in (0, 1]"),
    (["--top-k", "-1"], "--top-k must be >= 0"),
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer"),
    (["--device", "potato"], "--device 'potato' is not a device"),
])
def test_generate_bad_options_one_sentence_exit_2(tiny_run, capsys, flags, needle):
    assert main(["generate", str(tiny_run), "--max-new-tokens", "3", *flags]) == 2
    captured = capsys.readouterr()
    assert needle in _one_error_line(captured.err) and captured.out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_generate_on_cuda_without_cuda_exit_2(tiny_run, capsys):
    for device in ("cuda", "cuda:1"):
        assert main(["generate", str(tiny_run), "--device", device]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert f"--device is '{device}' but CUDA is not available" in line and "--device cpu" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_evaluate_on_cuda_without_cuda_exit_2(tiny_run, capsys):
    assert main(["evaluate", str(tiny_run), "--device", "cuda"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--device is 'cuda' but CUDA is not available" in line


def test_generate_with_nan_weights_exit_2(tiny_run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "run"
    shutil.copytree(tiny_run, bad)
    files = list((bad / "checkpoints").glob("*/model.safetensors"))
    assert files
    for f in files:
        weights = load_file(f)
        name = sorted(weights)[0]
        weights[name] = torch.full_like(weights[name], float("nan"))
        save_file(weights, f)
    assert main(["generate", str(bad), "--max-new-tokens", "3"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "are not finite" in line and "NaN or inf" in line and "earlier checkpoint" in line


def test_generate_valid_edge_options_still_sample(tiny_run, capsys):
    argv = ["generate", str(tiny_run), "--prompt", "The heart", "--max-new-tokens", "4",
            "--top-p", "1", "--top-k", "0", "--num-samples", "2", "--temperature", "0.7", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2 and out.count("The heart") == 2


def test_sampling_checks_in_the_library():
    from neuroplastic.evaluation.generation import check_sampling

    check_sampling(temperature=0.0, top_k=0, top_p=1.0, num_samples=1, max_new_tokens=1)
    check_sampling(temperature=2.0, top_k=None, top_p=None)
    with pytest.raises(UserError, match="top-p"):
        check_sampling(temperature=1.0, top_p=-0.1)


# -- item: neurogen train --resume ignores --embedding-dim -----------------------------------
def test_neurogen_resume_notes_an_ignored_embedding_dim(tmp_path, capsys):
    from neuroplastic.neurogen.train import TrainOptions, train

    data = tmp_path / "c.txt"
    data.write_text(SAMPLE_TEXT)
    out = tmp_path / "run"
    train(TrainOptions(data=str(data), out=str(out), tokens_per_chunk=128, max_seq_length=32, max_chunks=2,
                       checkpoint_interval=2, embedding_dim=8, gpu_device=-1, scale=1 / 32,
                       overrides=["sparsity=0.0625"], tensorboard=False, progress=False), echo=lambda s: None)
    common = ["neurogen", "train", "--data", str(data), "--out", str(out), "--no-progress", "--no-tensorboard",
              "--gpu-device", "-1", "--tokens-per-chunk", "128", "--max-seq-length", "32",
              "--checkpoint-interval", "2", "--resume"]
    assert main([*common, "--embedding-dim", "64", "--scale", "0.03125", "--max-chunks", "3"]) == 0
    out_text = capsys.readouterr().out
    assert ("note: --embedding-dim 64 (the checkpoint has 8) is ignored with --resume; the checkpoint "
            "step_0000002 decides the model's size") in out_text
    assert "embedding_dim=8" in out_text  # the model really is the checkpoint's
    assert main([*common, "--max-chunks", "4"]) == 0  # nothing given: no note
    assert "note: --embedding-dim" not in capsys.readouterr().out


def test_cli_prints_our_warnings_as_one_line_without_a_source_location(tmp_path):
    p = tmp_path / "latin.txt"
    p.write_bytes(("Café naïve résumé: déjà vu. " * 200).encode("latin-1"))
    r = run_cli("train", "tiny", *tiny_overrides(p, tmp_path / "run", **{"train.max_steps": 1}))
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "not valid UTF-8" in ln]
    assert lines and all(ln.startswith("neuroplastic: warning: ") for ln in lines)
    assert "DataWarning" not in r.stderr and "warn_data(" not in r.stderr
