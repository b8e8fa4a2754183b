"""Hugging Face integration: loading, LoRA, adapters, HFCausalLM, Trainer callback.

Every model is built tiny from a config (2 layers, 32 dims), saved with
``save_pretrained`` and loaded back through :func:`load_causal_lm`; nothing is downloaded.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from conftest import SAMPLE_TEXT  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from neuroplastic.data.tokenizers import BPETokenizer  # noqa: E402
from neuroplastic.errors import UserError  # noqa: E402
from neuroplastic.models.hf import (  # noqa: E402
    HFCausalLM,
    apply_lora,
    export_merged,
    load_adapter,
    load_causal_lm,
    save_adapter,
)
from neuroplastic.plasticity import EWC, Hebbian, PlasticityEngine, Rule, Traces  # noqa: E402
from neuroplastic.training.hf_callback import (  # noqa: E402
    PLASTICITY_JSON,
    PLASTICITY_TENSORS,
    NeuroplasticCallback,
    NeuroplasticTrainer,
    load_plasticity_state,
)

SEQ = 16


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is fastest and avoids oversubscribing shared cores."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tokenizer():
    return BPETokenizer.train([SAMPLE_TEXT], vocab_size=300)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer):
    """A tiny GPT-2 and a tiny Qwen2, each saved with the tokenizer in its own directory."""
    torch.manual_seed(0)
    v = tokenizer.vocab_size
    models = {
        "gpt2": GPT2LMHeadModel(GPT2Config(
            n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=v,
            bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )),
        "qwen2": Qwen2ForCausalLM(Qwen2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64, vocab_size=v,
            bos_token_id=0, eos_token_id=0, tie_word_embeddings=False,
        )),
    }
    dirs = {}
    for kind, model in models.items():
        d = tmp_path_factory.mktemp(kind)
        model.save_pretrained(str(d))
        tokenizer.save(d)
        dirs[kind] = d
    return dirs


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, tokenizer, seq: int = SEQ, n: int = 16):
        ids = tokenizer.encode(SAMPLE_TEXT)
        self.items = [torch.tensor(ids[i * seq:(i + 1) * seq]) for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i], "labels": self.items[i]}


def collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def training_args(out, **kw):
    base = dict(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=2, learning_rate=5e-3,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        disable_tqdm=True, dataloader_pin_memory=False, lr_scheduler_type="constant",
    )
    base.update(kw)
    return TrainingArguments(**base)


def one_sentence(msg: str) -> bool:
    return "\n" not in msg and msg.endswith(".") and not re.search(r"[.;]\s+[A-Z][a-z]", msg)


def assert_state_equal(a, b, exact=True, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, path
        if exact:
            assert torch.equal(a.cpu(), b.cpu()), path
        else:
            torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-6, atol=1e-7, msg=path)
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_state_equal(a[k], b[k], exact, f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_state_equal(x, y, exact, f"{path}[{i}]")
    elif isinstance(a, float) and not exact:
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7), path
    else:
        assert a == b, path


def logits_of(model, idx):
    model.eval()
    with torch.no_grad():
        return model(input_ids=idx).logits


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_lora_trainer_with_rules_and_adapter_roundtrip(kind, model_dirs, tokenizer, tmp_path):
    model, tok = load_causal_lm(model_dirs[kind], gradient_checkpointing=(kind == "qwen2"))
    assert tok.pad_token_id is not None and model.config.pad_token_id == tok.pad_token_id
    assert model.config.use_cache is (kind != "qwen2")  # checkpointing turns the cache off
    torch.manual_seed(0)
    model = apply_lora(model, r=4, alpha=8)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert lora_before and all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())

    ds = TokenDataset(tokenizer)
    engine = PlasticityEngine(model, [
        Traces(params="*lora_*", plasticity_lr=1e-3),
        EWC(params="*lora_*", lam=100.0),
        Hebbian(params="*lora_A*", lr=1e-3),
    ])
    model.eval()  # no Hebbian recording during the Fisher pass
    engine.rule("ewc").consolidate([collate([ds[0], ds[1]])], lambda m, b: m(**b).loss)

    trainer = NeuroplasticTrainer(
        model=model, args=training_args(tmp_path / "run"), train_dataset=ds,
        data_collator=collate, engine=engine,
        reward_fn=lambda state: 1.0 / (1.0 + trainer.plasticity.last_loss),
    )
    trainer.train()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4 and all(math.isfinite(h["loss"]) for h in logs)
    assert all(h["plasticity/traces/update_norm"] > 0 for h in logs)
    assert all(h["plasticity/hebbian/update_norm"] > 0 for h in logs)
    assert logs[-1]["plasticity/ewc/penalty"] > 0
    assert "plasticity/reward" in logs[-1]
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n
    changed = [n for n, p in model.named_parameters() if n in lora_before and not torch.equal(p, lora_before[n])]
    assert len(changed) == len(lora_before)

    # the training loss carries the EWC penalty
    batch = collate([ds[2], ds[3]])
    model.train()
    total = trainer.compute_loss(model, batch)  # training mode with grad: penalty added
    plain = model(**batch).loss + engine.penalty()
    assert float(engine.penalty().detach()) > 0
    engine.rule("hebbian").clear()
    torch.testing.assert_close(total, plain)

    # adapters reload onto a fresh base with identical logits
    idx = batch["input_ids"]
    save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    fresh, _ = load_causal_lm(model_dirs[kind])
    loaded = load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(logits_of(loaded, idx), logits_of(model, idx), rtol=0, atol=1e-6)

    # merged export loads without peft and gives the same logits
    export_merged(model, tmp_path / "merged", tok)
    merged, _ = load_causal_lm(tmp_path / "merged")
    torch.testing.assert_close(logits_of(merged, idx), logits_of(model, idx), rtol=1e-5, atol=1e-5)
    engine.close()


class Probe(TrainerCallback):
    def __init__(self, engine_of):
        self.engine_of = engine_of
        self.at_begin = None
        self.at_step = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.at_begin = copy.deepcopy(self.engine_of().state_dict())

    def on_step_end(self, args, state, control, **kwargs):
        self.at_step[state.global_step] = copy.deepcopy(self.engine_of().state_dict())


def _lora_gpt2(model_dirs, seed):
    model, _ = load_causal_lm(model_dirs["gpt2"])
    torch.manual_seed(seed)
    return apply_lora(model, r=4, alpha=8)


def _rules():
    return [Traces(params="*lora_*", plasticity_lr=1e-3, low_rank=True, rank=2),
            Hebbian(params="*lora_A*", lr=1e-3)]


def test_resume_from_trainer_checkpoint_restores_engine_exactly(model_dirs, tokenizer, tmp_path):
    ds = TokenDataset(tokenizer)
    out = tmp_path / "run"
    args = training_args(out, save_strategy="steps", save_steps=2)

    def reward(state):
        return float(state.global_step % 3)

    model_a = _lora_gpt2(model_dirs, 0)
    engine_a = PlasticityEngine(model_a, _rules())
    probe_a = Probe(lambda: engine_a)
    trainer_a = NeuroplasticTrainer(
        model=model_a, args=args, train_dataset=ds, data_collator=collate,
        engine=engine_a, reward_fn=reward, callbacks=[probe_a],
    )
    trainer_a.train()
    ckpt = out / "checkpoint-2"
    assert (ckpt / PLASTICITY_JSON).is_file() and (ckpt / PLASTICITY_TENSORS).is_file()
    assert_state_equal(load_plasticity_state(ckpt), probe_a.at_step[2])
    final_a = copy.deepcopy(engine_a.state_dict())
    lora_a = {n: p.detach().clone() for n, p in model_a.named_parameters() if "lora_" in n}
    engine_a.close()

    # a plain Trainer + callback resumes from checkpoint-2 (found from global_step)
    model_b = _lora_gpt2(model_dirs, 1)
    engine_b = PlasticityEngine(model_b, _rules())
    probe_b = Probe(lambda: engine_b)
    trainer_b = Trainer(
        model=model_b, args=args, train_dataset=ds, data_collator=collate,
        callbacks=[NeuroplasticCallback(engine_b, reward_fn=reward), probe_b],
    )
    trainer_b.train(resume_from_checkpoint=str(ckpt))
    assert_state_equal(probe_b.at_begin, probe_a.at_step[2])
    assert_state_equal(engine_b.state_dict(), final_a, exact=False)
    for n, p in model_b.named_parameters():
        if n in lora_a:
            torch.testing.assert_close(p.detach(), lora_a[n], rtol=1e-6, atol=1e-7)
    engine_b.close()

    # a checkpoint without plasticity state is refused on resume
    (ckpt / PLASTICITY_JSON).unlink()
    with pytest.raises(UserError, match="saved without NeuroplasticCallback"):
        load_plasticity_state(ckpt)


def test_rules_from_specs_bind_to_trainer_optimizer(model_dirs, tokenizer, tmp_path):
    model = _lora_gpt2(model_dirs, 0)
    trainer = NeuroplasticTrainer(
        model=model, args=training_args(tmp_path / "run", max_steps=3),
        train_dataset=TokenDataset(tokenizer), data_collator=collate,
        rules=[{"type": "adaptive_lr", "sensitivity": 5.0, "ema_decay": 0.5},
               {"type": "eligibility", "params": "*lora_B*"}],
        reward_fn=lambda state: -trainer.plasticity.last_loss,
    )
    trainer.train()
    engine = trainer.engine
    assert engine.rule("adaptive_lr").optimizer is trainer.optimizer.optimizer
    logs = [h for h in trainer.state.log_history if "loss" in h]
    mults = [h["plasticity/adaptive_lr/lr_multiplier"] for h in logs]
    assert any(m != 1.0 for m in mults[1:])
    assert all(h["learning_rate"] == pytest.approx(5e-3) for h in logs)  # scheduled lr restored
    engine.close()


class CountingRule(Rule):
    name = "counting"

    def setup(self):
        self.calls = []

    def after_backward(self):
        self.calls.append(("backward", all(p.grad is not None for p in self.params)))

    def after_step(self, advantage):
        self.calls.append(("step", advantage))


@pytest.mark.parametrize("mode", ["events", "wrapped"])
def test_hook_points_once_per_optimizer_step(mode, model_dirs, tokenizer, tmp_path, monkeypatch):
    """Recent transformers: on_pre_optimizer_step; older ones: a wrapped optimizer.step()."""
    import neuroplastic.training.hf_callback as hf_callback

    if mode == "wrapped":
        monkeypatch.setattr(hf_callback, "_HAS_PRE_OPTIMIZER_STEP", False)
    model = _lora_gpt2(model_dirs, 0)
    rule = CountingRule(params="*lora_*")
    engine = PlasticityEngine(model, [rule])
    trainer = NeuroplasticTrainer(
        model=model, args=training_args(tmp_path / "run", max_steps=2, gradient_accumulation_steps=2),
        train_dataset=TokenDataset(tokenizer), data_collator=collate, engine=engine,
        reward_fn=lambda state: float(state.global_step),
    )
    trainer.train()
    # advantages: 1 - 0, then 2 - 0.01 (baseline decay 0.99)
    assert rule.calls == [("backward", True), ("step", 1.0), ("backward", True), ("step", pytest.approx(1.99))]
    assert not hasattr(trainer.optimizer.step, "_neuroplastic_wrapper")  # unwrapped again
    engine.close()


# ----------------------------------------------------------------------------- HFCausalLM


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_hfcausallm_forward_and_generate(kind, model_dirs):
    model, tok = load_causal_lm(model_dirs[kind])
    lm = HFCausalLM(model, tok)
    assert lm.config.block_size == 64 and lm.config.vocab_size == len(tok)
    assert 0 < lm.num_params() <= lm.num_params(non_embedding=False)

    g = torch.Generator().manual_seed(0)
    idx = torch.randint(2, lm.config.vocab_size, (2, 12), generator=g)
    targets = torch.randint(2, lm.config.vocab_size, (2, 12), generator=g)
    targets[0, :3] = -100
    logits, loss = lm(idx, targets)
    with torch.no_grad():
        ref_logits = model(input_ids=idx).logits
    logp = ref_logits.float().log_softmax(-1)
    keep = targets != -100
    hand = -logp[keep].gather(-1, targets[keep].unsqueeze(-1)).mean()
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(loss, hand)
    assert lm(idx)[1] is None

    eos = tok.eos_token_id
    ours = lm.generate(idx, 10, temperature=0, eos_id=eos)
    hf = model.generate(
        input_ids=idx, attention_mask=torch.ones_like(idx), max_new_tokens=10, do_sample=False,
        eos_token_id=eos, pad_token_id=eos,
    )
    assert torch.equal(ours, hf)
    assert torch.equal(lm.generate(idx, 10, temperature=0, eos_id=eos, use_cache=False), ours)

    # past block_size: the context is cropped, with and without the cache alike
    long = lm.generate(idx[:, :2].repeat(1, 30), 8, temperature=0)
    assert long.shape == (2, 68)
    assert torch.equal(long, lm.generate(idx[:, :2].repeat(1, 30), 8, temperature=0, use_cache=False))

    s1 = lm.generate(idx, 6, temperature=1.0, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3))
    s2 = lm.generate(idx, 6, temperature=1.0, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2) and s1.shape == (2, 18)
    assert not lm.training and not model.training


@pytest.mark.parametrize("path", ["head-select", "logits-to-keep"])
@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_targets_only_skips_prompt_logits_with_the_same_loss_and_gradients(
    kind, path, model_dirs, monkeypatch
):
    """``targets_only``: the output layer runs only at the target positions (a pre-hook
    hands it their hidden states) or, for model types not known to allow that, from the
    first position holding a target (``logits_to_keep``); loss and every gradient equal
    the full forward's, logits are one row per target, and lm_metrics gives the same
    numbers; a model without the argument falls back."""
    from neuroplastic.evaluation.lm import lm_metrics
    from neuroplastic.models import hf as hf_mod
    from neuroplastic.models.api import forward_targets, supports_targets_only

    if path == "logits-to-keep":
        monkeypatch.setattr(hf_mod, "HEAD_SELECT_TYPES", frozenset())
    model, tok = load_causal_lm(model_dirs[kind])
    lm = HFCausalLM(model, tok)
    assert supports_targets_only(lm) and supports_targets_only(torch.nn.Sequential(lm)) is False
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(2, lm.config.vocab_size, (3, 16), generator=g)
    targets = torch.randint(2, lm.config.vocab_size, (3, 16), generator=g)
    targets[0, :9], targets[1, :5], targets[2, :12] = -100, -100, -100  # prompts
    targets[1, 14:] = -100  # padding
    mask = targets != -100

    seen, head_rows = [], []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(dict(kw)), with_kwargs=True)
    head = model.get_output_embeddings().register_forward_hook(
        lambda m, a, out: head_rows.append(out.shape[:-1]))
    full_logits, full = lm(idx, targets)
    full.backward()
    full_grads = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
    lm.zero_grad()
    logits, loss = forward_targets(lm, idx, targets)
    loss.backward()
    hook.remove()
    head.remove()
    assert "logits_to_keep" not in seen[0]
    if path == "head-select":
        assert head_rows[1] == (int(mask.sum()),)  # the output layer saw the 18 targets only
    else:
        assert seen[1].get("logits_to_keep") == 11 and head_rows[1] == (3, 11)  # positions 5..
    assert logits.shape == (int(mask.sum()), lm.config.vocab_size)
    torch.testing.assert_close(logits, full_logits[mask])
    torch.testing.assert_close(loss, full)
    grads = {n: p.grad for n, p in lm.named_parameters() if p.grad is not None}
    assert grads.keys() == full_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], full_grads[n])

    # nothing to score: the plain forward
    assert forward_targets(lm, idx, torch.full_like(targets, -100))[0].shape == (3, 16, lm.config.vocab_size)

    # lm_metrics: the targets-only path vs the full logits of the same model
    class Plain(torch.nn.Module):  # no targets_only: full logits, cross-entropy by hand
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, y=None):
            return self.inner(x, y)

    batches = [(idx, targets), (idx[:2], targets[:2])]
    byte_lengths = torch.ones(lm.config.vocab_size, dtype=torch.long)
    a, b = lm_metrics(lm, batches, byte_lengths), lm_metrics(Plain(lm), batches, byte_lengths)
    assert a["tokens"] == b["tokens"] == int(mask.sum() + mask[:2].sum())
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert a["bpb"] == pytest.approx(b["bpb"], rel=1e-6)


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_give_one_clear_sentence(model_dirs, tmp_path):
    from transformers import BertConfig, BertModel, CLIPTextConfig, CLIPTextModel

    def err(fn, *args, **kwargs):
        with pytest.raises(UserError) as info:
            fn(*args, **kwargs)
        msg = str(info.value)
        assert one_sentence(msg), msg
        return msg

    assert "does not exist" in err(load_causal_lm, tmp_path / "missing")
    msg = err(load_causal_lm, "some-org/some-model")
    assert "was not found" in msg and "model.allow_hub=true" in msg and "--allow-hub" not in msg
    (tmp_path / "empty").mkdir()
    assert "no config.json" in err(load_causal_lm, tmp_path / "empty")

    bert = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, vocab_size=300)).save_pretrained(str(bert))
    (tmp_path / "bert" / "tokenizer.json").write_bytes((model_dirs["gpt2"] / "tokenizer.json").read_bytes())
    assert "causal-LM head" in err(load_causal_lm, bert)
    clip = tmp_path / "clip"
    CLIPTextModel(CLIPTextConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64, vocab_size=300)).save_pretrained(str(clip))
    assert "no causal language-model head" in err(load_causal_lm, clip)

    if not torch.cuda.is_available():
        msg = err(load_causal_lm, model_dirs["gpt2"], load_in_4bit=True)
        assert "needs a CUDA GPU and the bitsandbytes package" in msg

    assert "Unknown dtype" in err(load_causal_lm, model_dirs["gpt2"], dtype="float64")
    model, _ = load_causal_lm(model_dirs["gpt2"], dtype="bfloat16")
    assert model.transformer.wte.weight.dtype == torch.bfloat16

    model, _ = load_causal_lm(model_dirs["gpt2"])
    msg = err(apply_lora, model, target_modules=["c_attn", "no_such_layer"])
    assert "'no_such_layer'" in msg and "c_attn" in msg
    assert "LoRA adapters" in err(save_adapter, model, tmp_path / "a")
    assert "adapter_config.json" in err(load_adapter, model, tmp_path / "empty")
    assert "one of engine and rules" in err(NeuroplasticCallback)


# ----------------------------------------------------------------------------- LoRA checkpoints


@pytest.fixture(scope="module")
def wide_base(tmp_path_factory, tokenizer):
    """A GPT-2 of 1.7M parameters (6.7 MB) saved with save_pretrained."""
    torch.manual_seed(1)
    d = tmp_path_factory.mktemp("wide")
    GPT2LMHeadModel(GPT2Config(
        n_layer=2, n_head=4, n_embd=256, n_positions=64, vocab_size=tokenizer.vocab_size,
        bos_token_id=0, eos_token_id=0,
    )).save_pretrained(str(d))
    tokenizer.save(d)
    return d


def _lora_cfg(base, text_file, out, **extra):
    from conftest import tiny_overrides

    from neuroplastic.config import load_config

    over = tiny_overrides(text_file, out, **{
        "model.block_size": 32, "train.max_steps": 6, "train.ckpt_interval": 2,
        "train.keep_last": 5, "train.lr": 0.01, "train.eval_interval": 100,
        "model.lora": "{r: 2, alpha: 4}",
        "plasticity.rules": "[{type: hebbian, params: '*lora_A*'}]", **extra,
    }) + [f"model={base}"]
    return load_config("tiny", over)


def _dir_bytes(d):
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def test_lora_checkpoint_holds_adapters_and_resumes_bit_exactly(wide_base, text_file, tmp_path):
    from neuroplastic.models import checkpoint_io
    from neuroplastic.training import checkpoint as ckpt
    from neuroplastic.training.trainer import Trainer

    straight = Trainer(_lora_cfg(wide_base, text_file, tmp_path / "a"))
    straight.train()
    part1 = Trainer(_lora_cfg(wide_base, text_file, tmp_path / "b"))
    part1.train(stop_at=4)
    step2 = checkpoint_io.latest_checkpoint(part1.ckpt_dir)
    from safetensors import safe_open

    with safe_open(str(step2 / "model.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all("lora_" in k for k in keys)
    assert meta["neuroplastic_kind"] == "lora-adapter" and meta["base_model"] == str(wide_base)
    from neuroplastic.models.registry import base_model_fingerprint

    assert meta["base_sha256"] == base_model_fingerprint(wide_base)
    base_bytes = _dir_bytes(wide_base)
    assert _dir_bytes(step2) < 0.05 * base_bytes, (_dir_bytes(step2), base_bytes)
    part2 = Trainer(_lora_cfg(wide_base, text_file, tmp_path / "b", **{"train.resume": "auto"}))
    part2.train()
    assert part2.resumed_from is not None and part2.resumed_from.name == ckpt.checkpoint_name(4)
    combined = [h["loss"] for h in part1.history[:4]] + [h["loss"] for h in part2.history]
    assert combined == [h["loss"] for h in straight.history]
    for (na, a), (nb, b) in zip(straight.model.named_parameters(), part2.model.named_parameters()):
        assert na == nb and torch.equal(a, b), na
    for sa, sb in zip(straight.optimizer.state.values(), part2.optimizer.state.values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
    # inference re-attaches the adapters to the base the run names
    from neuroplastic.models.loading import load_trained

    model, tok, _, _ = load_trained(tmp_path / "a", prefer="latest")
    x = torch.tensor([tok.encode("The heart is an organ")])
    straight.model.eval()
    with torch.no_grad():
        assert torch.equal(model(x)[0], straight.model(x)[0])


def test_lora_checkpoint_with_changed_base_weights_stores_them(wide_base, text_file, tmp_path):
    """A rule that edits frozen base weights in place: those tensors are stored too."""
    from neuroplastic.training.trainer import Trainer

    cfg = _lora_cfg(wide_base, text_file, tmp_path / "a", **{"train.max_steps": 2})
    t = Trainer(cfg).setup()
    frozen = next(n for n, p in t.model.named_parameters() if "wpe" in n)
    with torch.no_grad():
        dict(t.model.named_parameters())[frozen].mul_(0.5)
    t.train()
    from safetensors import safe_open

    with safe_open(str(t.ckpt_dir / "step_0000002" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert frozen in keys and not any("wte" in k or "c_attn.base_layer" in k for k in keys)
    from neuroplastic.models.loading import load_trained

    model, *_ = load_trained(tmp_path / "a", prefer="latest")
    assert torch.equal(dict(model.named_parameters())[frozen], dict(t.model.named_parameters())[frozen])


def test_lora_checkpoint_on_another_base_is_one_sentence(wide_base, text_file, tmp_path, capsys):
    import shutil

    from conftest import run_cli

    from neuroplastic.training.trainer import Trainer

    base = tmp_path / "base"
    shutil.copytree(wide_base, base)
    Trainer(_lora_cfg(base, text_file, tmp_path / "run", **{"train.max_steps": 2})).train()
    other = tmp_path / "other"
    shutil.copytree(wide_base, other)
    torch.manual_seed(5)
    GPT2LMHeadModel(GPT2LMHeadModel.config_class.from_pretrained(str(wide_base))).save_pretrained(str(other))
    from neuroplastic.models.loading import load_any_model

    with pytest.raises(UserError) as info:
        load_any_model(tmp_path / "run", base_model=str(other))
    msg = str(info.value)
    assert one_sentence(msg) and "trained on base model" in msg and "sha256" in msg, msg
    # the same base directory with other weights: resume stops before step 1, exit 2
    shutil.rmtree(base)
    shutil.copytree(other, base)
    from conftest import tiny_overrides

    r = run_cli("train", "tiny", *tiny_overrides(text_file, tmp_path / "run", **{
        "model.block_size": 32, "train.max_steps": 4, "train.ckpt_interval": 2,
        "train.keep_last": 5, "train.lr": 0.01, "train.eval_interval": 100,
        "model.lora": "{r: 2, alpha: 4}",
        "plasticity.rules": "[{type: hebbian, params: '*lora_A*'}]"}), f"model={base}", "--resume")
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("neuroplastic: error:")]
    assert len(errors) == 1 and one_sentence(errors[0]) and "trained on base model" in errors[0]
    assert "Traceback" not in r.stderr
    # with the right base it loads
    model, _, info = load_any_model(tmp_path / "run", base_model=str(wide_base))
    assert info["kind"] == "neuroplastic checkpoint"


# ----------------------------------------------------------------------------- refused files


def test_pickled_weights_refused_by_weights_only_are_one_sentence(model_dirs, tmp_path, capsys):
    """A pytorch_model.bin holding more than tensors: one sentence, exit 2, and the advice
    never says weights_only=False."""
    import argparse
    import shutil

    from neuroplastic.cli import main

    d = tmp_path / "binmodel"
    shutil.copytree(model_dirs["gpt2"], d)
    model, _ = load_causal_lm(d)
    state = dict(model.state_dict())
    state["extra"] = argparse.Namespace(a=1)
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(UserError) as info:
        load_causal_lm(d)
    msg = str(info.value)
    assert one_sentence(msg) and "refuses to unpickle" in msg and "argparse.Namespace" in msg
    assert "weights_only" not in msg
    assert main(["train", "tiny", f"model={d}", f"train.out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "refuses to unpickle" in err and "weights_only" not in err and "Traceback" not in err


def _custom_code_dir(model_dirs, tmp_path):
    """A GPT-2 whose config says its model lives in the directory's own Python files."""
    import json
    import shutil

    d = tmp_path / "custom"
    shutil.copytree(model_dirs["gpt2"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="tiny_custom_lm", architectures=["TinyCustomLM"], auto_map={
        "AutoConfig": "configuration_tiny.TinyCustomConfig",
        "AutoModelForCausalLM": "modeling_tiny.TinyCustomLM",
    })
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "configuration_tiny.py").write_text(
        "from transformers import GPT2Config\n\n\n"
        "class TinyCustomConfig(GPT2Config):\n    model_type = 'tiny_custom_lm'\n")
    (d / "modeling_tiny.py").write_text(
        "from transformers import GPT2LMHeadModel\n\n"
        "from .configuration_tiny import TinyCustomConfig\n\n\n"
        "class TinyCustomLM(GPT2LMHeadModel):\n    config_class = TinyCustomConfig\n")
    return d


def test_custom_code_needs_explicit_opt_in(model_dirs, tmp_path, capsys, monkeypatch):
    from neuroplastic.cli import main
    from neuroplastic.config import load_config

    d = _custom_code_dir(model_dirs, tmp_path)
    assert load_config("tiny", [f"model={d}"]).model.hf.trust_remote_code is False
    with pytest.raises(UserError) as info:
        load_causal_lm(d)
    msg = str(info.value)
    assert one_sentence(msg) and "model.trust_remote_code=true" in msg
    assert "configuration_tiny.py" in msg and "modeling_tiny.py" in msg
    assert main(["train", "tiny", f"model={d}", f"train.out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("trust).") and len(err.splitlines()) == 1  # whole, not cut off
    # opting in runs the directory's code
    import sys

    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # not ~/.cache
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in [m for m in sys.modules if m.startswith("transformers_modules")]:
        monkeypatch.delitem(sys.modules, name)
    model, _ = load_causal_lm(d, trust_remote_code=True)
    assert type(model).__name__ == "TinyCustomLM"
    # auto_map on a model type transformers knows: its own class, no custom code, no error
    import json

    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    model, _ = load_causal_lm(d)
    assert type(model).__name__ == "GPT2LMHeadModel"


def test_saved_adapter_records_its_base_and_refuses_another(wide_base, text_file, tmp_path):
    import json
    import shutil

    from neuroplastic.models.loading import load_any_model
    from neuroplastic.models.registry import base_model_fingerprint
    from neuroplastic.training.trainer import Trainer

    t = Trainer(_lora_cfg(wide_base, text_file, tmp_path / "run", **{"train.max_steps": 1}))
    t.train()
    save_adapter(t.model, tmp_path / "adapter")
    ref = json.loads((tmp_path / "adapter" / "neuroplastic_base.json").read_text())
    assert ref == {"name": str(wide_base), "sha256": base_model_fingerprint(wide_base)}
    model, _, info = load_any_model(tmp_path / "adapter")  # the base found from the record
    assert info["base_model"] == str(wide_base)
    other = tmp_path / "other"
    shutil.copytree(wide_base, other)
    torch.manual_seed(7)
    GPT2LMHeadModel(GPT2LMHeadModel.config_class.from_pretrained(str(wide_base))).save_pretrained(str(other))
    with pytest.raises(UserError) as info:
        load_any_model(tmp_path / "adapter", base_model=str(other))
    assert one_sentence(str(info.value)) and "other weights" in str(info.value)
