"""Hugging Face models through our trainer and CLI (model=PATH), with LoRA and rules."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from neuroplastic.config import load_config  # noqa: E402
from neuroplastic.data.tokenizers import BPETokenizer  # noqa: E402
from neuroplastic.models.loading import load_trained  # noqa: E402
from neuroplastic.training.trainer import Trainer  # noqa: E402
from tests.conftest import SAMPLE_TEXT, run_cli, tiny_overrides  # noqa: E402


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    tok = BPETokenizer.train([SAMPLE_TEXT], vocab_size=300)
    torch.manual_seed(0)
    v = tok.vocab_size
    models = {
        "gpt2": GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128,
                                           vocab_size=v, bos_token_id=0, eos_token_id=0)),
        "qwen2": Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, num_key_value_heads=1,
                                              max_position_embeddings=128, vocab_size=v,
                                              bos_token_id=0, eos_token_id=0)),
    }
    out = {}
    for kind, m in models.items():
        d = tmp_path_factory.mktemp(kind)
        m.save_pretrained(str(d))
        tok.save(d)
        out[kind] = d
    return out


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_our_trainer_with_lora_rules_and_exact_reload(tmp_path, text_file, hf_dirs, kind):
    over = tiny_overrides(text_file, tmp_path / "run", **{
        "model.block_size": 32, "train.max_steps": 4, "train.lr": 0.01,
        "model.lora": "{r: 4, alpha: 8}",
        "plasticity.rules": "[{type: ewc, params: '*lora*'}, {type: hebbian, params: '*lora_A*'}]",
    }) + [f"model={hf_dirs[kind]}"]
    cfg = load_config("tiny", over)
    assert cfg.model.arch == "hf" and cfg.data.tokenizer == str(hf_dirs[kind])
    t = Trainer(cfg)
    base_before = {n: p.detach().clone() for n, p in t.setup().model.named_parameters()}
    summary = t.train()
    assert summary["step"] == 4
    changed = {n for n, p in t.model.named_parameters() if not torch.equal(p, base_before[n])}
    assert changed and all("lora" in n for n in changed)
    model, tok, cfg2, path = load_trained(tmp_path / "run", prefer="latest")
    x = torch.tensor([tok.encode("The heart is an organ")])
    t.model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x)[0], t.model(x)[0], atol=1e-6)


def test_controlled_generation_cli_with_local_gpt2(tmp_path, hf_dirs):
    out = tmp_path / "cg"
    r = run_cli("train", "controlled-generation", f"model={hf_dirs['gpt2']}", "model.lora={r: 4}",
                "model.block_size=64", "train.max_steps=2", "train.eval_interval=2",
                "train.progress=false", "train.tensorboard=false", "data.max_chars=6000",
                "options.max_new_tokens=[8]", "options.samples_per_prompt=2",
                "options.prompts_per_step=1", "options.weights={length: 0.5, bleu: 0.5}",
                "options.term_options={length: {target: 6, unit: tokens}}",
                f"train.out_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(rec["kind"] == "control" for rec in recs)
    r = run_cli("generate", str(out), "--prompt", "The heart", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr[-2000:]


def test_bad_hf_inputs_exit_2(tmp_path, hf_dirs):
    r = run_cli("train", "tiny", f"model={tmp_path / 'nope'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = run_cli("train", "tiny", f"model={hf_dirs['gpt2']}", "model.lora={r: 4, target_modules: [nothing_here]}",
                f"train.out_dir={tmp_path / 'o'}")
    assert r.returncode == 2 and "nothing_here" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("train", "tiny", f"model={hf_dirs['gpt2']}", "model.load_in_4bit=true",
                f"train.out_dir={tmp_path / 'q'}")
    assert r.returncode == 2 and "CUDA" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
