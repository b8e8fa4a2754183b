"""Typed run configuration: dataclasses loaded from YAML recipes plus dotted overrides.

A recipe is a YAML file with the sections of :class:`RunConfig`::

    model: {n_layer: 4, n_embd: 128}      # or nested: model: {gpt: {n_layer: 4}}
    data:  {source: synthetic, tokenizer: byte}
    train: {max_steps: 300, lr: 3e-3}

``neuroplastic train tiny model.n_layer=2 train.max_steps=50`` applies overrides on
top. Unknown keys name the closest valid keys; wrong types say the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from neuroplastic.errors import UserError

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


@dataclass(slots=True)
class GPTConfig:
    """The transformer's shape: arch=gpt, and the attention blocks of arch=hebbian
    (see :mod:`neuroplastic.models.transformer`)."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    pos: str = "rope"  # rope | learned
    rope_theta: float = 10000.0
    # which head dims RoPE rotates together: interleaved (2i, 2i+1) | halves (i, i + d/2);
    # a saved config without this key was trained with halves (see config_from_saved)
    rope_pairing: str = "interleaved"
    tie_weights: bool = True
    mlp_ratio: float = 4.0


@dataclass(slots=True)
class HebbianConfig:
    """arch=hebbian (agiformer): the Hebbian fast-weight memory beside each block's
    sliding-window attention (see :mod:`neuroplastic.models.hebbian`)."""

    window: int = 128  # local attention window (tokens)
    memory_heads: int = 0  # 0: gpt.n_head
    memory_rule: str = "hebbian"  # hebbian | delta
    feature_map: str = "elu1"  # identity_l2 | elu1 | seed
    chunk_size: int = 64  # chunk length of the chunk-parallel memory kernel
    conv_size: int = 0  # causal depthwise conv over the memory's q/k/v (tokens; 0: none)
    conv_init: str = "random"  # random (torch's) | shift (q, v: this token; k: the one before)
    memory_qkv: str = "shared"  # shared (with the local attention) | own projection
    # initial decay logits p (lambda = (0.99 + 0.01 sigmoid(p)) alpha): [] = spread over
    # [-3, 3] across memory heads (0 for one head), [p] = every head, or one per head
    decay_logit_init: list[float] = dataclasses.field(default_factory=list)
    # delta rule: a learned bias on the write-strength logits, initialised to this value
    # (beta = sigmoid(W h + b)); None: no bias (beta = sigmoid(W h))
    beta_bias: float | None = None
    # developmental decay scale at initialisation; per curriculum stage the trainer sets
    # the model's own copy (curriculum.alphas), not this field
    alpha: float = 1.0


@dataclass(slots=True)
class HFConfig:
    """arch=hf: any Hugging Face causal LM from a local directory (a hub name needs
    allow_hub). ``path`` is the flat key ``model.hf_path``."""

    path: str = ""
    allow_hub: bool = False
    trust_remote_code: bool = False  # run a model directory's own Python code (auto_map); off by default
    lora: dict = dataclasses.field(default_factory=dict)  # {r, alpha, dropout, target_modules}; {} = full fine-tune
    gradient_checkpointing: bool = False
    load_in_4bit: bool = False  # bitsandbytes, CUDA only
    load_in_8bit: bool = False


@dataclass(slots=True)
class ModelConfig:
    """The model: its architecture, vocabulary and context, and one section per family.

    ``gpt`` is the transformer's shape (arch ``gpt``, and ``hebbian``'s attention blocks),
    ``hebbian`` the fast-weight memory (arch ``hebbian``), ``hf`` a Hugging Face model
    (arch ``hf``). Recipes and overrides may name a section's field flat, as before the
    sections existed: ``model.n_layer`` is ``model.gpt.n_layer``, ``model.window`` is
    ``model.hebbian.window``, ``model.hf_path`` is ``model.hf.path`` (see
    :data:`FLAT_MODEL_KEYS`); :meth:`from_flat` builds one from such keys.
    """

    arch: str = "gpt"  # gpt | hebbian | hf
    vocab_size: int = 0  # 0: taken from the tokenizer
    block_size: int = 256  # maximum context length
    gpt: GPTConfig = dataclasses.field(default_factory=GPTConfig)
    hebbian: HebbianConfig = dataclasses.field(default_factory=HebbianConfig)
    hf: HFConfig = dataclasses.field(default_factory=HFConfig)

    @classmethod
    def from_flat(cls, **values: Any) -> ModelConfig:
        """``ModelConfig.from_flat(n_layer=2, window=16, hf_path=...)``: keys as a recipe's
        ``model:`` section takes them (flat or nested), checked and converted alike."""
        return build_dataclass(cls, values, "model")


#: the sections of :class:`ModelConfig` and their classes
MODEL_SECTIONS: dict[str, type] = {"gpt": GPTConfig, "hebbian": HebbianConfig, "hf": HFConfig}
#: a section field's flat key where it is not the field's own name
_FLAT_RENAMES = {("hf", "path"): "hf_path"}
#: flat key under ``model`` -> (section, field): ``n_layer`` -> ``("gpt", "n_layer")``
FLAT_MODEL_KEYS: dict[str, tuple[str, str]] = {
    _FLAT_RENAMES.get((section, f.name), f.name): (section, f.name)
    for section, section_cls in MODEL_SECTIONS.items()
    for f in dataclasses.fields(section_cls)
}


@dataclass
class DataConfig:
    """Where training text comes from and how it becomes token blocks."""

    source: str = "synthetic"  # synthetic | registry name | file | directory | hf:NAME
    field: str = "text"  # jsonl / HF datasets field holding the text
    tokenizer: str = "byte"  # byte | bpe | path to a tokenizer dir or GPT-2 files
    bpe_vocab_size: int = 2048
    block_size: int = 0  # 0: model.block_size
    val_fraction: float = 0.05
    max_chars: int = 0  # 0: no limit; otherwise truncate the corpus (quick runs)
    data_dir: str = ""  # searched first for registry corpora ("" -> env / ../shared/data)
    synthetic_seed: int = 0
    stages: list[str] = dataclasses.field(default_factory=list)  # synthetic stages to use ([] = all)
    recall_max_bytes: int = 2048  # source=needle: longest training haystack (bytes)


@dataclass
class TrainConfig:
    """The one trainer's knobs."""

    out_dir: str = "runs/{name}"
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    max_steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    amp: str = "auto"  # auto | bf16 | fp16 | none
    compile: bool = False
    eval_interval: int = 200
    eval_batches: int = 20
    log_interval: int = 10
    ckpt_interval: int = 200
    keep_last: int = 2
    keep_best: bool = True
    sample_interval: int = 0  # 0: only at the end
    sample_tokens: int = 64
    sample_temperature: float = 0.8
    sample_prompt: str = ""
    max_nonfinite: int = 5
    resume: str = "none"  # none | auto | path to a checkpoint dir
    progress: bool = True
    tensorboard: bool = True
    # under torchrun: auto (= ddp when several processes) | ddp | fsdp (FSDP2 fully_shard)
    parallel: str = "auto"
    peak_tflops: float = 0.0  # peak of one device for MFU; 0: datasheet (known GPUs) or measured


@dataclass
class PlasticityConfig:
    """Plasticity rules attached to the trainer (see :mod:`neuroplastic.plasticity`).

    ``rules`` is a list of mappings ``{type: traces, params: "*.weight", ...}`` whose
    other keys are the rule's constructor arguments.
    """

    rules: list[dict] = dataclasses.field(default_factory=list)
    baseline_decay: float = 0.99  # EMA decay of the reward baseline (advantage = r - baseline)
    normalize_advantage: bool = False
    # replay: with a rule that keeps a buffer (consolidation with replay_capacity > 0), every
    # `replay_every` steps one past batch joins the step as an extra micro-batch
    replay_every: int = 0
    replay_weight: float = 1.0


@dataclass
class RewardConfig:
    """Reward on sampled generations against curriculum references, every ``interval`` steps."""

    interval: int = 0  # 0: no reward (reward-modulated rules then never update)
    weights: dict = dataclasses.field(
        default_factory=lambda: {"rouge_l": 0.4, "unique_word_ratio": 0.2, "diversity": 0.2, "perplexity": 0.2}
    )
    num_prompts: int = 4
    max_new_tokens: int = 48
    temperature: float = 0.8
    top_k: int = 50
    perplexity_form: str = "linear"  # linear (seed): clip(1 - (ppl-1)/10, 0, 1) | exp: exp(-(ppl-1)/tau) | inverse: 1/ppl
    perplexity_tau: float = 10.0


@dataclass
class CurriculumConfig:
    """Stages of training data, e.g. definitions -> explanations -> dialogues.

    A stage is a synthetic stage name (when ``data.source`` is ``synthetic``) or any
    data source spec. ``advance``: ``steps`` (at ``boundaries``, fractions of
    ``train.max_steps``; default equal thirds) or ``plateau`` (when the stage's
    validation loss has not improved by ``min_delta`` for ``patience`` evals).
    """

    stages: list[str] = dataclasses.field(default_factory=list)  # [] = no curriculum
    advance: str = "steps"  # steps | plateau
    boundaries: list[float] = dataclasses.field(default_factory=list)
    patience: int = 3
    min_delta: float = 0.01
    cumulative: bool = False  # train on all stages so far instead of the current one only
    # per-stage value of the model's developmental decay scale (agiformer: 0.1, 0.5, 0.99);
    # [] leaves the alpha the model was built with (model.hebbian.alpha, flat: model.alpha) alone
    alphas: list[float] = dataclasses.field(default_factory=list)


@dataclass
class RunConfig:
    name: str = "run"
    description: str = ""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    plasticity: PlasticityConfig = dataclasses.field(default_factory=PlasticityConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    curriculum: CurriculumConfig = dataclasses.field(default_factory=CurriculumConfig)
    # a recipe module whose loop differs (neuroplastic.recipes.<module>) and its options
    recipe_module: str = ""
    options: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> RunConfig:
        """Check values a type check cannot; raise UserError naming the key."""
        t, m, d = self.train, self.model, self.data
        g, h = m.gpt, m.hebbian
        positive = {
            "train.max_steps": t.max_steps,
            "train.batch_size": t.batch_size,
            "train.grad_accum": t.grad_accum,
            "train.eval_batches": t.eval_batches,
            "model.block_size": m.block_size,
            "model.n_layer": g.n_layer,
            "model.n_head": g.n_head,
            "model.n_embd": g.n_embd,
        }
        for key, value in positive.items():
            if value <= 0:
                raise UserError(f"{key} must be a positive integer, got {value}.")
        finite = {
            "train.lr": t.lr, "train.min_lr": t.min_lr, "train.weight_decay": t.weight_decay,
            "train.beta1": t.beta1, "train.beta2": t.beta2, "train.grad_clip": t.grad_clip,
            "train.sample_temperature": t.sample_temperature, "train.peak_tflops": t.peak_tflops,
            "model.rope_theta": g.rope_theta, "model.dropout": g.dropout,
            "model.mlp_ratio": g.mlp_ratio, "model.alpha": h.alpha,
        }
        for key, value in finite.items():
            if not math.isfinite(value):
                raise UserError(f"{key} must be a finite number, got {value}.")
        for key, value in {"train.beta1": t.beta1, "train.beta2": t.beta2}.items():
            if not 0 <= value < 1:
                raise UserError(f"{key} must be in [0, 1) (AdamW's moment decay), got {value}.")
        if g.rope_theta <= 0:
            raise UserError(f"model.rope_theta must be > 0, got {g.rope_theta}.")
        at_least_one = {"train.log_interval": t.log_interval, "train.max_nonfinite": t.max_nonfinite}
        for key, value in at_least_one.items():
            if value < 1:
                raise UserError(f"{key} must be >= 1, got {value}.")
        off_or_positive = {
            "train.eval_interval": t.eval_interval, "train.ckpt_interval": t.ckpt_interval,
            "train.sample_interval": t.sample_interval, "train.sample_tokens": t.sample_tokens,
        }
        for key, value in off_or_positive.items():
            if value < 0:
                raise UserError(f"{key} must be >= 0 (0 turns it off), got {value}.")
        try:
            t.out_dir.format(name=self.name)
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            raise UserError(
                f"train.out_dir {t.out_dir!r} has a placeholder other than {{name}} ({exc}); "
                "use {name} (the recipe's name) or a plain path."
            ) from None
        nonneg = {
            "train.lr": t.lr,
            "train.min_lr": t.min_lr,
            "train.weight_decay": t.weight_decay,
            "train.warmup_steps": t.warmup_steps,
            "train.grad_clip": t.grad_clip,
            "model.dropout": g.dropout,
            "data.block_size": d.block_size,
            "data.max_chars": d.max_chars,
        }
        for key, value in nonneg.items():
            if value < 0:
                raise UserError(f"{key} must be >= 0, got {value}.")
        if t.lr == 0:
            raise UserError("train.lr must be > 0, got 0.")
        if not 0 <= g.dropout < 1:
            raise UserError(f"model.dropout must be in [0, 1), got {g.dropout}.")
        if not 0 < d.val_fraction < 1:
            raise UserError(f"data.val_fraction must be in (0, 1), got {d.val_fraction}.")
        if g.n_embd % g.n_head:
            raise UserError(
                f"model.n_embd ({g.n_embd}) must be divisible by model.n_head ({g.n_head})."
            )
        if g.pos == "rope" and (g.n_embd // g.n_head) % 2:
            raise UserError(
                f"RoPE needs an even head size, but model.n_embd / model.n_head = "
                f"{g.n_embd // g.n_head}; change model.n_head or use model.pos=learned."
            )
        if d.block_size > m.block_size:
            raise UserError(
                f"data.block_size ({d.block_size}) is larger than the model context "
                f"model.block_size ({m.block_size}); lower data.block_size or raise model.block_size."
            )
        choices = {
            "model.norm": (g.norm, ("rmsnorm", "layernorm")),
            "model.pos": (g.pos, ("rope", "learned")),
            "model.arch": (m.arch, ("gpt", "hebbian", "hf")),
            "model.memory_rule": (h.memory_rule, ("hebbian", "delta")),
            "model.feature_map": (h.feature_map, ("identity_l2", "elu1", "seed")),
            "model.conv_init": (h.conv_init, ("random", "shift")),
            "model.memory_qkv": (h.memory_qkv, ("shared", "own")),
            "train.amp": (t.amp, ("auto", "bf16", "fp16", "none")),
            "train.parallel": (t.parallel, ("auto", "ddp", "fsdp")),
        }
        if m.arch == "hf" and not m.hf.path:
            raise UserError("model.arch=hf needs model.hf_path (a local Hugging Face model directory).")
        c = self.curriculum
        choices["curriculum.advance"] = (c.advance, ("steps", "plateau"))
        choices["reward.perplexity_form"] = (self.reward.perplexity_form, ("linear", "exp", "inverse"))
        if c.boundaries:
            if len(c.boundaries) != max(len(c.stages) - 1, 0):
                raise UserError(
                    f"curriculum.boundaries needs {max(len(c.stages) - 1, 0)} values (one per stage "
                    f"change), got {len(c.boundaries)}."
                )
            if any(not 0 < b < 1 for b in c.boundaries) or c.boundaries != sorted(c.boundaries):
                raise UserError("curriculum.boundaries must be increasing fractions in (0, 1).")
        if c.alphas and len(c.alphas) != len(c.stages):
            raise UserError(
                f"curriculum.alphas needs one value per stage ({len(c.stages)}), got {len(c.alphas)}."
            )
        if self.reward.interval < 0:
            raise UserError(f"reward.interval must be >= 0, got {self.reward.interval}.")
        for i, rule in enumerate(self.plasticity.rules):
            if not isinstance(rule, dict) or "type" not in rule:
                raise UserError(
                    f"plasticity.rules[{i}] must be a mapping with a 'type' key (e.g. type: traces)."
                )
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise UserError(f"{key} must be one of {', '.join(allowed)}; got {value!r}.")
        return self

    @property
    def block_size(self) -> int:
        """The training sequence length."""
        return self.data.block_size or self.model.block_size


# --------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a CLI string already YAML-parsed) to ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except UserError:
                continue
        raise UserError(f"{key} expects {_type_name(tp)}, got {value!r}.")
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, list | tuple):
            raise UserError(f"{key} expects a list, got {value!r}.")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key} expects a mapping, got {value!r}.")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserError(f"{key} expects a boolean (true/false), got {value!r}.")
    if tp is int:
        if isinstance(value, bool):
            raise UserError(f"{key} expects an integer, got {value!r}.")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
        raise UserError(f"{key} expects an integer, got {value!r}.")
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"{key} expects a number, got {value!r}.")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{key} expects a number, got {value!r}.")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{key} expects a string, got {value!r}.")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{key} expects a mapping of {tp.__name__} fields, got {value!r}.")
        return build_dataclass(tp, value, key)
    return value


def _closest(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    return "valid keys: " + ", ".join(candidates) + "."


def build_dataclass(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    if cls is ModelConfig:
        values = nest_model_keys(values, prefix or "model")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        full = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            if cls is ModelConfig:  # flat and nested names alike
                candidates = all_keys(cls, prefix)
            elif cls in MODEL_SECTIONS.values():  # a field of another section is close too
                candidates = all_keys(ModelConfig, prefix.rpartition(".")[0])
            else:
                candidates = [f"{prefix}.{n}" if prefix else n for n in names]
            raise UserError(f"Unknown config key {full!r}; {_closest(full, candidates)}")
        kwargs[k] = _coerce(v, hints[k], full)
    return cls(**kwargs)


def nest_model_keys(values: dict[str, Any], prefix: str = "model") -> dict[str, Any]:
    """A ``model:`` mapping with its flat keys moved into their sections: ``{n_layer: 6,
    hf_path: X}`` -> ``{gpt: {n_layer: 6}, hf: {path: X}}`` (:data:`FLAT_MODEL_KEYS`).
    A setting given both ways with different values is a UserError. ``values`` is not
    changed; the moved values are converted to their field's type."""
    flat = [k for k in values if k in FLAT_MODEL_KEYS]
    if not flat:
        return values
    out = {k: v for k, v in values.items() if k not in FLAT_MODEL_KEYS}
    for key in flat:
        section, name = FLAT_MODEL_KEYS[key]
        section_cls = MODEL_SECTIONS[section]
        sub = out.get(section, {})
        if not isinstance(sub, dict):
            raise UserError(
                f"{prefix}.{section} expects a mapping of {section_cls.__name__} fields, got {sub!r}."
            )
        sub = dict(sub)
        hint = typing.get_type_hints(section_cls)[name]
        value = _coerce(values[key], hint, f"{prefix}.{key}")
        if name in sub:
            other = _coerce(sub[name], hint, f"{prefix}.{section}.{name}")
            if other != value:
                raise UserError(
                    f"{prefix}.{key} and {prefix}.{section}.{name} are the same setting, given two "
                    f"values ({value!r} and {other!r}); keep one of them."
                )
        sub[name] = value
        out[section] = sub
    return out


def canonical_key(key: str) -> str:
    """The nested spelling of a dotted key: ``model.n_layer`` -> ``model.gpt.n_layer``,
    ``model.lora.r`` -> ``model.hf.lora.r``; other keys are returned unchanged."""
    parts = key.split(".")
    if len(parts) >= 2 and parts[0] == "model" and parts[1] in FLAT_MODEL_KEYS:
        parts[1:2] = FLAT_MODEL_KEYS[parts[1]]
    return ".".join(parts)


def all_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of a config class (leaves only), under ``model`` both the nested
    (``model.gpt.n_layer``) and the flat (``model.n_layer``) spelling."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        full = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(all_keys(hints[f.name], full))
        else:
            keys.append(full)
    if cls is ModelConfig:
        keys.extend(f"{prefix}.{k}" if prefix else k for k in FLAT_MODEL_KEYS)
    return keys


def parse_override(text: str) -> tuple[str, Any]:
    """``"model.n_layer=4"`` -> ``("model.n_layer", 4)`` (value parsed as YAML)."""
    if "=" not in text:
        raise UserError(
            f"Override {text!r} is not of the form key=value (e.g. train.max_steps=200)."
        )
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"Override {text!r} has an empty key.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``tree['a']['b'] = value`` for ``key='a.b'``, checking the key exists. A flat
    model key sets its section's field (``model.n_layer`` -> ``tree['model']['gpt']``), so
    ``tree``'s model section must be nested already (:func:`nest_model_keys`)."""
    parts = canonical_key(key).split(".")
    cls: Any = RunConfig
    node = tree
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            so_far = ".".join(parts[:i])
            names = [f"{so_far}.{n}" if so_far else n for n in hints]
            # keys of the whole section (model.gpt.window: model.hebbian.window is close)
            leaf_keys = [k for k in all_keys() if k.startswith(parts[0] + ".")] if so_far else all_keys()
            raise UserError(
                f"Unknown config key {key!r}; {_closest(key, leaf_keys or names)}"
            )
        tp = hints[part]
        if i == len(parts) - 1:
            node[part] = value
        else:
            if tp is dict or typing.get_origin(tp) is dict:
                # free-form mapping (e.g. options, reward.weights): any sub-keys, set on top
                # of the recipe's mapping or, when the recipe has none, the default one
                child = node.get(part)
                if not isinstance(child, dict):
                    field = next(f for f in dataclasses.fields(cls) if f.name == part)
                    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else {}
                    child = dict(default)
                    node[part] = child
                for sub in parts[i + 1 : -1]:
                    nxt = child.get(sub)
                    if not isinstance(nxt, dict):
                        nxt = {}
                        child[sub] = nxt
                    child = nxt
                child[parts[-1]] = value
                return
            if not dataclasses.is_dataclass(tp):
                typed = key.split(".")  # as the user wrote it: flat keys are one part shorter
                shown = ".".join(typed[: i + 1 - (len(parts) - len(typed))])
                raise UserError(f"Config key {shown!r} has no sub-keys.")
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
            cls = tp


def config_from_dict(values: dict[str, Any]) -> RunConfig:
    if not isinstance(values, dict):
        raise UserError("A recipe must be a YAML mapping with sections model, data, train.")
    return build_dataclass(RunConfig, values)


#: model fields added after runs were first saved -> the value a saved config that lacks
#: the field was trained with (today's default may differ: the new field changed it)
SAVED_MODEL_DEFAULTS: dict[tuple[str, str], Any] = {("gpt", "rope_pairing"): "halves"}


def config_from_saved(values: dict[str, Any]) -> RunConfig:
    """A run's or checkpoint's saved ``config.yaml`` (already parsed): as
    :func:`config_from_dict`, except that a model field the saved config predates takes
    the value the run was trained with (:data:`SAVED_MODEL_DEFAULTS`), not today's
    default. Recipes and overrides go through :func:`config_from_dict`."""
    if isinstance(values, dict) and isinstance(values.get("model"), dict):
        model = dict(values["model"])
        for (section, name), old in SAVED_MODEL_DEFAULTS.items():
            nested = model.get(section)
            if isinstance(nested, dict):
                if name not in nested:
                    model[section] = {**nested, name: old}
            elif _FLAT_RENAMES.get((section, name), name) not in model:
                model[_FLAT_RENAMES.get((section, name), name)] = old
        values = {**values, "model": model}
    return config_from_dict(values)


def available_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def read_recipe(name_or_path: str, _depth: int = 0) -> dict[str, Any]:
    """Raw mapping of a built-in recipe name or a YAML file path.

    A recipe may name another as ``base:``; its mapping is deep-merged underneath.
    """
    recipes = available_recipes()
    path = recipes.get(name_or_path)
    if path is None:
        candidate = Path(name_or_path)
        if candidate.is_dir():
            raise UserError(
                f"Recipe path {str(candidate)!r} is a directory; give a recipe YAML file or a "
                "built-in recipe name (see `neuroplastic recipes`)."
            )
        if candidate.suffix in (".yaml", ".yml") or candidate.exists():
            if not candidate.is_file():
                raise UserError(f"Recipe file {str(candidate)!r} does not exist.")
            path = candidate
        else:
            close = difflib.get_close_matches(name_or_path, list(recipes), n=3, cutoff=0.4)
            hint = ("did you mean " + " or ".join(close) + "?") if close else (
                "available: " + ", ".join(recipes) + "."
            )
            raise UserError(f"Unknown recipe {name_or_path!r}; {hint}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"Recipe {str(path)!r} is not valid YAML ({first}).") from exc
    if not isinstance(values, dict):
        raise UserError(f"Recipe {str(path)!r} must be a YAML mapping.")
    if isinstance(values.get("model"), dict):
        # each file's flat model keys into their sections before merging, so that a flat
        # key in one file and the nested key in its base are one setting
        try:
            values["model"] = nest_model_keys(values["model"])
        except UserError as exc:
            raise UserError(f"Recipe {str(path)!r}: {exc}") from None
    base = values.pop("base", None)
    if base is not None:
        if _depth >= 8:
            raise UserError(f"Recipe {str(path)!r}: 'base' recipes nest too deeply (a cycle?).")
        parent = read_recipe(str(base), _depth + 1)
        parent.pop("name", None)
        parent.pop("description", None)
        values = _deep_merge(parent, values)
    values.setdefault("name", path.stem)
    return values


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(recipe: str, overrides: list[str] | None = None) -> RunConfig:
    """Load a recipe by name (``tiny``) or path and apply ``key=value`` overrides."""
    values = read_recipe(recipe)
    given: dict[str, tuple[str, Any]] = {}  # nested key -> (key as typed, value)
    for text in overrides or []:
        key, value = parse_override(text)
        if key == "model" and isinstance(value, str):
            # shortcut: model=PATH -> a Hugging Face causal LM and its own tokenizer
            set_dotted(values, "model.arch", "hf")
            set_dotted(values, "model.hf.path", value)
            set_dotted(values, "data.tokenizer", value)
            continue
        nested = canonical_key(key)
        typed, before = given.get(nested, (key, value))
        if typed != key and before != value:
            raise UserError(
                f"{typed}={before!r} and {key}={value!r} are the same setting ({nested}) with "
                "two values; give it once."
            )
        given[nested] = (key, value)
        set_dotted(values, key, value)
    return config_from_dict(values).validate()


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
