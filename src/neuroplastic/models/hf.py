"""Hugging Face causal LMs in neuroplastic: loading, LoRA, adapters, export, and a wrapper.

* :func:`load_causal_lm` loads any ``AutoModelForCausalLM`` + tokenizer from a local
  directory, a model registry name (``smollm2-135m-instruct``, made once into the cache by
  :mod:`neuroplastic.models.registry`) or, only with ``allow_hub=True``, a hub name
  (config, safetensors and tokenizer files only), optionally with gradient checkpointing or
  4-/8-bit weights (bitsandbytes, CUDA only). Pickled weights that ``weights_only`` refuses
  and custom model code (without ``trust_remote_code``) are one-sentence errors.
* :func:`apply_lora` adds LoRA adapters (peft) to the layers that match name patterns
  (chosen per architecture when none are given); :func:`save_adapter` /
  :func:`load_adapter` write and read them as safetensors, and :func:`export_merged`
  writes a plain ``save_pretrained`` model with the adapters merged in.
* :class:`HFCausalLM` lets our trainer, scorers and generation code use a Hugging Face
  model through the same API as :class:`~neuroplastic.models.transformer.GPT`:
  ``logits, loss = model(idx, targets)`` and ``model.generate(idx, max_new_tokens, ...)``.

Works with transformers 4.4x and 5.x (``dtype`` vs ``torch_dtype`` is chosen by
version) and peft >= 0.10. ``transformers`` and ``peft`` are imported lazily, so this
module imports without them; a function that needs them says how to install them.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import importlib.util
import inspect
import json
import logging
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neuroplastic.errors import UserError
from neuroplastic.models.api import LanguageModel
from neuroplastic.models.transformer import generate_loop

__all__ = [
    "BASE_REF_FILE",
    "LORA_TARGETS",
    "HFCausalLM",
    "HFModelInfo",
    "apply_lora",
    "check_adapter_base",
    "export_merged",
    "hf_context_length",
    "load_adapter",
    "load_causal_lm",
    "local_model_dir",
    "lora_target_names",
    "save_adapter",
]

#: LoRA targets per ``config.model_type`` (suffixes of module names, peft's convention).
_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_bigcode": ["c_attn", "c_proj", "c_fc"],
    "llama": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "qwen2_moe": _LLAMA_LIKE,
    "qwen3_moe": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"],
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "smollm3": _LLAMA_LIKE,
    "granite": _LLAMA_LIKE,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.txt",
)
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


# =========================================================================== helpers


def _require(package: str) -> Any:
    if importlib.util.find_spec(package) is None:
        raise UserError(
            f"Hugging Face models need the {package} package; install it with "
            "pip install 'neuroplastic[hf]'."
        )
    return importlib.import_module(package)


def _transformers_at_least(version: str) -> bool:
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__.split("+")[0]) >= Version(version)


def _first_line(exc: BaseException, limit: int = 120) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit].rstrip(" .")


def _unwrap(model: Any) -> nn.Module:
    """The transformers / peft model inside an :class:`HFCausalLM` (or the model itself)."""
    return model.model if isinstance(model, HFCausalLM) else model


def _rewrap(original: Any, inner: nn.Module) -> Any:
    """Return ``inner`` in the same kind of object ``original`` was (wrapper or not)."""
    if isinstance(original, HFCausalLM):
        return HFCausalLM(inner, original.tokenizer)
    return inner


def is_peft(model: Any) -> bool:
    if importlib.util.find_spec("peft") is None:
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _resolve_source(name_or_path: str | Path, allow_hub: bool) -> tuple[str, bool]:
    """``(source, is_local)``; every problem with the path is a :class:`UserError`.

    A registry name (``smollm2-135m-instruct``, see :mod:`neuroplastic.models.registry`)
    that is not also an existing path becomes its cached directory, made on first use.
    """
    from neuroplastic.models.registry import MODELS, is_registry_name, resolve_model

    text = str(name_or_path)
    if not text.strip():
        raise UserError("The model name is empty; give a local model directory.")
    path = Path(text).expanduser()
    if not path.exists() and is_registry_name(text):
        path = Path(resolve_model(text))
    if path.exists():
        if not path.is_dir():
            raise UserError(
                f"Model path {text!r} is a file; point at the directory that holds config.json "
                "and the weights."
            )
        if not (path / "config.json").is_file():
            raise UserError(
                f"Model directory {text!r} has no config.json; point at a directory written by "
                "save_pretrained."
            )
        return str(path), True
    looks_like_path = (
        text.startswith((".", "/", "~"))
        or "\\" in text
        or text.count("/") > 1
        or text.endswith("/")
    )
    if looks_like_path:
        raise UserError(f"Model directory {text!r} does not exist; check the path.")
    if not allow_hub:
        raise UserError(
            f"Model {text!r} was not found: it is neither a local directory nor a registry model "
            f"({', '.join(sorted(MODELS))}); give a model directory, or set model.allow_hub=true "
            "to download it from the Hugging Face Hub."
        )
    return str(_hub_snapshot(text)), True


#: What is taken from a hub repository: config, safetensors weights, tokenizer files --
#: never pickled ``*.bin`` weights or Python code.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def _hub_snapshot(repo_id: str) -> Path:
    """Download (or find in the Hugging Face cache) ``repo_id``'s files of :data:`HUB_PATTERNS`."""
    _require("huggingface_hub")
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # the hub raises many kinds (HTTP, offline, repo not found)
        raise UserError(
            f"Cannot download model {repo_id!r} from the Hugging Face Hub ({_first_line(exc)}); "
            "check the name and the network, or give a local model directory."
        ) from exc
    if not (path / "config.json").is_file():
        raise UserError(f"Hub model {repo_id!r} has no config.json; it is not a transformers model.")
    if not any(path.glob("*.safetensors")):
        raise UserError(
            f"Hub model {repo_id!r} has no safetensors weights, and neuroplastic does not load "
            "pickled weights from the hub; choose a repository that ships .safetensors files."
        )
    return path


def local_model_dir(name_or_path: str | Path, allow_hub: bool = False) -> Path:
    """A local directory holding the model ``name_or_path`` (config, weights, tokenizer).

    A directory is returned as it is, a registry name becomes its cached directory (made
    on first use), and a hub name, only with ``allow_hub``, is downloaded into the Hugging
    Face cache (:data:`HUB_PATTERNS`). Used where a path is needed for more than the
    model, e.g. the tokenizer of ``model=NAME``.
    """
    return Path(_resolve_source(name_or_path, allow_hub)[0])


def _parse_dtype(dtype: Any) -> Any:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key == "auto":
        return "auto"
    if key not in _DTYPES:
        raise UserError(
            f"Unknown dtype {dtype!r}; use one of float32, bfloat16, float16 or auto."
        )
    return _DTYPES[key]


def _check_quantization(load_in_4bit: bool, load_in_8bit: bool, device: Any) -> int | None:
    if load_in_4bit and load_in_8bit:
        raise UserError("Choose one of load_in_4bit and load_in_8bit, not both.")
    if not (load_in_4bit or load_in_8bit):
        return None
    bits = 4 if load_in_4bit else 8
    what = f"Loading a model in {bits}-bit needs a CUDA GPU and the bitsandbytes package"
    if not torch.cuda.is_available():
        raise UserError(
            f"{what}; this machine has no CUDA GPU, so load the model without {bits}-bit "
            "quantization."
        )
    if not str(device).startswith(("cuda", "auto")):
        raise UserError(f"{what}; choose device cuda instead of {str(device)!r}.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"{what}; install it with pip install bitsandbytes.")
    return bits


def _check_device(device: Any) -> None:
    text = str(device)
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"Device {text!r} was requested but this machine has no CUDA GPU; use cpu.")
    if text == "mps" and not torch.backends.mps.is_available():
        raise UserError("Device 'mps' was requested but MPS is not available here; use cpu.")


def _causal_lm_names() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else list(value))
    return names


def _check_causal_config(config: Any, source: str, trust_remote_code: bool) -> None:
    """Refuse configs that AutoModelForCausalLM cannot build (before loading any weight)."""
    from transformers import AutoModelForCausalLM

    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and "AutoModelForCausalLM" in auto_map:
        return
    if type(config) not in AutoModelForCausalLM._model_mapping:
        arch = ", ".join(getattr(config, "architectures", None) or []) or type(config).__name__
        raise UserError(
            f"Model {source!r} is a {arch} ({getattr(config, 'model_type', '?')}), which has no "
            "causal language-model head; choose a causal LM such as GPT-2, Qwen2 or Llama."
        )


def _check_custom_code(directory: Path, trust_remote_code: bool) -> None:
    """Refuse, in one sentence, a directory whose model exists only as its own Python code
    (``auto_map`` in config.json and a ``model_type`` transformers does not know), unless
    ``trust_remote_code``. A known model type is loaded with transformers' own class, so the
    directory's code is never run."""
    if trust_remote_code:
        return
    try:
        doc = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # AutoConfig reports it
    auto_map = doc.get("auto_map") if isinstance(doc, dict) else None
    if not auto_map:
        return
    from transformers import CONFIG_MAPPING

    model_type = doc.get("model_type")
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        return
    files = sorted({str(v).split(".")[0] + ".py" for v in _flat_values(auto_map) if "--" not in str(v)})
    raise UserError(
        f"Model directory {str(directory)!r} defines its model in its own Python code "
        f"({', '.join(files) or 'auto_map in config.json'}), which neuroplastic does not run "
        "unless you opt in with model.trust_remote_code=true (only for code you have read and "
        "trust)."
    )


def _flat_values(obj: Any) -> list[Any]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _flat_values(v)]
    if isinstance(obj, list | tuple):
        return [x for v in obj for x in _flat_values(v)]
    return [obj]


def _refused_pickle_message(source: str, exc: BaseException | None) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", str(exc or ""))
    what = f" (it holds {found.group(1)})" if found else ""
    return (
        f"The weights of {source!r} are a pickle file that holds more than tensors{what}, which "
        "neuroplastic refuses to unpickle because that can run code; convert it to safetensors "
        "on a machine where you trust the file (load it and save_pretrained it again)."
    )


# =========================================================================== loading


def load_causal_lm(
    name_or_path: str | Path,
    *,
    allow_hub: bool = False,
    dtype: Any = None,
    device: str | torch.device = "cpu",
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    tokenizer_path: str | Path | None = None,
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer: ``(model, tokenizer)``.

    Args:
        name_or_path: a local directory written by ``save_pretrained`` (``config.json``,
            weights, tokenizer files), or a hub name when ``allow_hub`` is true.
        allow_hub: allow downloading ``name_or_path`` from the Hugging Face Hub. When
            false (default) everything is loaded with ``local_files_only=True``.
        dtype: ``None`` (float32; bfloat16 compute for 4-/8-bit), ``"auto"`` (the
            checkpoint's dtype), ``"float32"``, ``"bfloat16"``, ``"float16"`` or a
            ``torch.dtype``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or ``"auto"`` (accelerate's
            ``device_map="auto"``).
        load_in_4bit, load_in_8bit: quantized weights through bitsandbytes (CUDA only).
        gradient_checkpointing: enable non-reentrant gradient checkpointing (and turn off
            the KV cache during training, which it is incompatible with).
        trust_remote_code: allow the model's own code from its directory / the hub.
        tokenizer_path: load the tokenizer from here instead of ``name_or_path``.

    The tokenizer's pad token defaults to its eos token, and the model config's
    ``pad_token_id`` to the tokenizer's. The model is returned in eval mode.
    """
    _require("transformers")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source, local = _resolve_source(name_or_path, allow_hub)
    torch_dtype = _parse_dtype(dtype)
    bits = _check_quantization(load_in_4bit, load_in_8bit, device)
    if str(device) != "auto":
        _check_device(device)
    hub_kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if not allow_hub:
        hub_kwargs["local_files_only"] = True

    if local:
        _check_custom_code(Path(source), trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(source, **hub_kwargs)
    except (OSError, ValueError, KeyError) as exc:
        where = "directory" if local else "hub model"
        raise UserError(
            f"Cannot read the config of {where} {source!r} ({_first_line(exc)}); check that it "
            "is a Hugging Face model."
        ) from exc
    _check_causal_config(config, source, trust_remote_code)
    if tokenizer_path is not None:
        tok_source, tok_local = _resolve_source(tokenizer_path, allow_hub)
    else:
        tok_source, tok_local = source, local
    if tok_local and not any((Path(tok_source) / f).is_file() for f in _TOKENIZER_FILES):
        raise UserError(
            f"Directory {tok_source!r} has no tokenizer files (tokenizer.json or "
            "tokenizer_config.json); save the tokenizer next to the model or pass tokenizer_path."
        )

    kwargs: dict[str, Any] = dict(hub_kwargs)
    if bits is not None:
        from transformers import BitsAndBytesConfig

        compute = torch_dtype if isinstance(torch_dtype, torch.dtype) else torch.bfloat16
        if bits == 4:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=compute,
                bnb_4bit_use_double_quant=True,
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        torch_dtype = compute if torch_dtype is None else torch_dtype
        if str(device) == "auto":
            kwargs["device_map"] = "auto"
        else:
            dev = torch.device(device)
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            kwargs["device_map"] = {"": index}
    elif str(device) == "auto":
        kwargs["device_map"] = "auto"
    kwargs["dtype" if _transformers_at_least("4.56.0") else "torch_dtype"] = (
        torch.float32 if torch_dtype is None else torch_dtype
    )

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            source, output_loading_info=True, **kwargs
        )
    except pickle.UnpicklingError as exc:
        raise UserError(_refused_pickle_message(source, exc)) from exc
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        if isinstance(exc.__cause__ or exc.__context__, pickle.UnpicklingError):
            raise UserError(_refused_pickle_message(source, exc.__cause__ or exc.__context__)) from exc
        raise UserError(
            f"Cannot load the weights of {source!r} as a causal LM ({_first_line(exc)}); check "
            "that the directory is complete and was written by save_pretrained."
        ) from exc
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        archs = list(getattr(config, "architectures", None) or [])
        causal = _causal_lm_names()
        if not any(a in causal or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
            # e.g. a BertModel: AutoModelForCausalLM builds BertLMHeadModel with a random head
            raise UserError(
                f"Model {source!r} was saved as {', '.join(archs) or type(config).__name__} "
                f"without a trained causal-LM head (weights such as {', '.join(missing[:2])} are "
                "missing); load a *ForCausalLM or *LMHeadModel checkpoint."
            )
        logger.warning(
            "%d weights of %s were not in the checkpoint and are freshly initialised: %s",
            len(missing), source, ", ".join(missing[:5]),
        )

    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_source, **hub_kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"Cannot load the tokenizer from {tok_source!r} ({_first_line(exc)}); save it with "
            "the model or pass tokenizer_path."
        ) from exc
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None):
        tokenizer.pad_token = tokenizer.eos_token
    n_embed = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_embed:
        raise UserError(
            f"The tokenizer of {tok_source!r} has {len(tokenizer)} tokens but the model's "
            f"embedding has only {n_embed} rows; use the tokenizer the model was trained with."
        )
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id

    if bits is None and str(device) not in ("cpu", "auto"):
        model = model.to(device)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.eval()
    return model, tokenizer


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant gradient checkpointing, with the KV cache off during training."""
    inner = _unwrap(model)
    if is_peft(inner):
        inner = inner.get_base_model()
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise UserError(
            f"{type(inner).__name__} does not support gradient checkpointing; train without it."
        )
    # transformers >= 5.2x renamed gradient_checkpointing_enable to activation_checkpointing_enable
    if hasattr(type(inner), "activation_checkpointing_enable"):
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(inner.config, "use_cache"):
        inner.config.use_cache = False


def _is_checkpointing(model: nn.Module) -> bool:
    # transformers >= 5.2x renamed is_gradient_checkpointing (deprecated) to is_activation_checkpointing
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), attr):
            return bool(getattr(model, attr))
    return False


@contextlib.contextmanager
def _quiet_peft():
    """peft reads ``is_gradient_checkpointing``, which transformers 5.2x deprecated."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        yield


def _forward_params(model: nn.Module) -> Any:
    """The parameters of the (peft-unwrapped) model's ``forward``; empty if unreadable."""
    inner = model.get_base_model() if is_peft(model) else model
    try:
        return inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return {}


def _cache_kwarg(model: nn.Module) -> str:
    """The forward argument that takes the KV cache: ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (4.x and early 5.x)."""
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


#: Model types whose output layer is applied to the final hidden states as they are, with
#: only elementwise work after it, so that ``targets_only`` can hand it the target
#: positions alone (tested on tiny models of each: same loss and gradients).
HEAD_SELECT_TYPES = frozenset({"llama", "qwen2", "gpt2"})


def _keep_kwarg(model: nn.Module) -> str | None:
    """The forward argument that limits the output layer to the last N positions:
    ``logits_to_keep`` (transformers >= 4.50), ``num_logits_to_keep`` (4.45-4.49), or
    None when the model's forward takes neither (custom code, other families)."""
    params = _forward_params(model)
    return next((n for n in ("logits_to_keep", "num_logits_to_keep") if n in params), None)


# =========================================================================== LoRA


def _lora_layer_types() -> tuple[type, ...]:
    types: list[type] = [nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d]
    try:
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def _pattern_matcher(pattern: str):
    """A predicate on full module names.

    ``re:...`` is a regular expression (searched); a pattern with ``*``, ``?`` or ``[`` a
    shell glob on the full name; anything else a name suffix as in peft (``"c_attn"``
    matches ``transformer.h.0.attn.c_attn``).
    """
    if pattern.startswith("re:"):
        try:
            rx = re.compile(pattern[3:])
        except re.error as exc:
            raise UserError(
                f"LoRA target {pattern!r} is not a valid regular expression ({exc})."
            ) from exc
        return lambda name: bool(rx.search(name))
    if any(c in pattern for c in "*?["):
        rx = re.compile(fnmatch.translate(pattern))
        return lambda name: bool(rx.match(name))
    return lambda name: name == pattern or name.endswith("." + pattern)


def _adaptable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    types = _lora_layer_types()
    return [(n, m) for n, m in model.named_modules() if n and isinstance(m, types)]


def lora_target_names(model: nn.Module, target_modules: list[str] | str | None = None) -> list[str]:
    """Full names of the layers LoRA would adapt for ``target_modules`` (see :func:`apply_lora`).

    Raises :class:`UserError` for a pattern that matches no layer.
    """
    inner = _unwrap(model)
    if is_peft(inner):
        inner = inner.get_base_model()
    layers = _adaptable_layers(inner)
    out_emb = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if target_modules is None:
        model_type = getattr(getattr(inner, "config", None), "model_type", None)
        patterns = LORA_TARGETS.get(model_type or "")
        if patterns is None:  # unknown architecture: every linear layer but the output head
            patterns = sorted(
                {n.rsplit(".", 1)[-1] for n, m in layers if m is not out_emb
                 and not isinstance(m, nn.Embedding)}
            )
        names = [n for n, m in layers if m is not out_emb and any(
            _pattern_matcher(p)(n) for p in patterns)]
        if not names:
            raise UserError(
                f"Found no layers to adapt with LoRA in this {type(inner).__name__}; pass "
                "target_modules (e.g. the names of its attention projections)."
            )
        return names
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    patterns = list(target_modules)
    if not patterns:
        raise UserError("LoRA target_modules is empty; give at least one layer name pattern.")
    names: list[str] = []
    for p in patterns:
        match = _pattern_matcher(str(p))
        hits = [n for n, _ in layers if match(n)]
        if not hits:
            short = sorted({n.rsplit(".", 1)[-1] for n, _ in layers})
            raise UserError(
                f"LoRA target {p!r} matches no layer of this {type(inner).__name__}; layers "
                f"it has include {', '.join(short[:8])}."
            )
        names.extend(h for h in hits if h not in names)
    return names


def _is_plain(pattern: str) -> bool:
    return not pattern.startswith("re:") and not any(c in pattern for c in "*?[")


def _peft_targets(model: nn.Module, target_modules: list[str] | str | None, names: list[str]) -> list[str]:
    """What to give peft's ``target_modules``: the plain suffixes when they select exactly
    ``names`` (so the adapter config reads as usual), else the full module names."""
    if target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        suffixes = LORA_TARGETS.get(model_type or "") or []
        candidates = [s for s in suffixes if any(_pattern_matcher(s)(n) for n in names)]
    else:
        candidates = [target_modules] if isinstance(target_modules, str) else [str(p) for p in target_modules]
    if candidates and all(_is_plain(p) for p in candidates):
        matchers = [_pattern_matcher(p) for p in candidates]
        matching = {n for n, _ in model.named_modules() if n and any(m(n) for m in matchers)}
        if matching == set(names):
            return candidates
    return list(names)


def apply_lora(
    model: Any,
    *,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: list[str] | str | None = None,
    bias: str = "none",
    modules_to_save: list[str] | None = None,
) -> Any:
    """Wrap ``model`` in a peft ``PeftModel`` with LoRA adapters; only they are trainable.

    ``target_modules``: name patterns of the layers to adapt -- a plain name is a
    suffix as in peft (``"c_attn"``, ``"q_proj"``), a pattern with ``*?[`` a glob on the
    full module name (``"*.h.0.attn.c_attn"``), ``"re:..."`` a regular expression. Each
    pattern must match at least one layer. ``None``: chosen by architecture
    (:data:`LORA_TARGETS`; GPT-2 ``c_attn, c_proj, c_fc``; Qwen2 / Llama / Mistral the
    attention and MLP projections; otherwise every linear layer but the output head).
    GPT-2's ``Conv1D`` layers get ``fan_in_fan_out=True``. A 4-/8-bit model is first
    prepared with peft's ``prepare_model_for_kbit_training``.

    Returns a ``PeftModel`` (an :class:`HFCausalLM` when given one).
    """
    _require("peft")
    from peft import LoraConfig, get_peft_model

    inner = _unwrap(model)
    if is_peft(inner):
        raise UserError(
            "The model already has LoRA adapters; apply_lora once, or load_adapter on a fresh "
            "base model."
        )
    if int(r) < 1:
        raise UserError(f"LoRA rank r must be >= 1, got {r}.")
    if alpha <= 0:
        raise UserError(f"LoRA alpha must be > 0, got {alpha}.")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"LoRA dropout must be in [0, 1), got {dropout}.")
    if bias not in ("none", "all", "lora_only"):
        raise UserError(f"LoRA bias must be one of none, all, lora_only; got {bias!r}.")
    names = lora_target_names(inner, target_modules)
    modules = dict(inner.named_modules())
    targets = _peft_targets(inner, target_modules, names)
    # GPT-2 style Conv1D layers store their weight transposed
    fan_in_fan_out = any(type(modules[n]).__name__ == "Conv1D" for n in names)
    quantized = any(
        getattr(inner, a, False) for a in ("is_loaded_in_4bit", "is_loaded_in_8bit")
    ) or getattr(inner, "quantization_method", None) is not None
    if quantized:
        from peft import prepare_model_for_kbit_training

        inner = prepare_model_for_kbit_training(
            inner, use_gradient_checkpointing=_is_checkpointing(inner)
        )
    config = LoraConfig(
        r=int(r),
        lora_alpha=alpha,
        lora_dropout=float(dropout),
        target_modules=targets,
        bias=bias,
        fan_in_fan_out=fan_in_fan_out,
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
    )
    with _quiet_peft():
        peft_model = get_peft_model(inner, config)
    if _is_checkpointing(inner) and hasattr(peft_model, "enable_input_require_grads"):
        peft_model.enable_input_require_grads()
    return _rewrap(model, peft_model)


# =========================================================================== adapters / export


def _save_tokenizer(tokenizer: Any, directory: Path) -> None:
    if tokenizer is None:
        return
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(directory))
    else:  # one of ours
        tokenizer.save(directory)


def save_adapter(model: Any, directory: str | Path, tokenizer: Any = None) -> Path:
    """Write the LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    inner = _unwrap(model)
    if not is_peft(inner):
        raise UserError(
            f"save_adapter needs a model with LoRA adapters (from apply_lora), got "
            f"{type(inner).__name__}; use export_merged or save_pretrained for a plain model."
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    inner.save_pretrained(str(directory), safe_serialization=True)
    _save_tokenizer(tokenizer if tokenizer is not None else getattr(model, "tokenizer", None), directory)
    base_ref = getattr(model, "base_ref", None)
    if base_ref:  # which base the adapters belong to: name as the run gave it + weights sha256
        (directory / BASE_REF_FILE).write_text(json.dumps(base_ref, indent=2), encoding="utf-8")
    return directory


#: Written by :func:`save_adapter` next to the adapters of a model with a recorded base.
BASE_REF_FILE = "neuroplastic_base.json"


def check_adapter_base(adapter_dir: str | Path, base_dir: str | Path) -> None:
    """Raise a one-sentence :class:`UserError` when ``adapter_dir`` records a base (see
    :data:`BASE_REF_FILE`) whose weights differ from those in ``base_dir``."""
    from neuroplastic.models.registry import base_model_fingerprint

    path = Path(adapter_dir) / BASE_REF_FILE
    try:
        ref = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    want = ref.get("sha256") if isinstance(ref, dict) else None
    if want and base_model_fingerprint(base_dir) != want:
        raise UserError(
            f"The adapter in {str(adapter_dir)!r} was trained on base model "
            f"{str(ref.get('name'))!r} (weights sha256 {want[:12]}), but {str(base_dir)!r} holds "
            "other weights; load it onto the base it was trained on."
        )


def load_adapter(base_model: Any, directory: str | Path, *, is_trainable: bool = False) -> Any:
    """Load LoRA adapters written by :func:`save_adapter` onto ``base_model``.

    Returns a ``PeftModel`` (an :class:`HFCausalLM` when given one); with
    ``is_trainable`` the adapters can be trained further. Only safetensors adapters are
    read (a pickled ``adapter_model.bin`` is refused).
    """
    _require("peft")
    from peft import PeftModel

    directory = Path(directory)
    inner = _unwrap(base_model)
    if is_peft(inner):
        raise UserError(
            "load_adapter needs a base model without adapters; load a fresh one with "
            "load_causal_lm."
        )
    if not (directory / "adapter_config.json").is_file():
        raise UserError(
            f"{str(directory)!r} has no adapter_config.json; point at a directory written by "
            "save_adapter."
        )
    if not (directory / "adapter_model.safetensors").is_file():
        bin_file = directory / "adapter_model.bin"
        why = (
            "holds only a pickled adapter_model.bin, which neuroplastic refuses to load because "
            "unpickling can run code"
            if bin_file.is_file()
            else "has no adapter_model.safetensors"
        )
        raise UserError(f"{str(directory)!r} {why}; save the adapter again with save_adapter.")
    try:
        with _quiet_peft():
            peft_model = PeftModel.from_pretrained(inner, str(directory), is_trainable=is_trainable)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise UserError(
            f"The adapter in {str(directory)!r} does not fit this model ({_first_line(exc)}); "
            "load it onto the base model it was trained on."
        ) from exc
    return _rewrap(base_model, peft_model)


def export_merged(
    model: Any, directory: str | Path, tokenizer: Any = None, *, inplace: bool = False
) -> Path:
    """Merge the LoRA adapters into the weights and ``save_pretrained`` the plain model.

    The result loads with ``AutoModelForCausalLM.from_pretrained`` (or
    :func:`load_causal_lm`) without peft. The tokenizer (``tokenizer``, or the wrapper's)
    is saved next to it. By default the merge happens on a copy, so ``model`` keeps its
    adapters; ``inplace=True`` merges into ``model`` itself (no extra memory, but the
    adapters are gone afterwards).
    """
    inner = _unwrap(model)
    if is_peft(inner):
        src = inner if inplace else copy.deepcopy(inner)
        merged = src.merge_and_unload()
    else:
        merged = inner
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(directory))
    _save_tokenizer(tokenizer if tokenizer is not None else getattr(model, "tokenizer", None), directory)
    return directory


# =========================================================================== wrapper


@dataclass
class HFModelInfo:
    """What our code reads from ``model.config``: ``block_size``, ``vocab_size`` and ``arch`` as
    on :class:`~neuroplastic.config.ModelConfig`, and the shape (``n_layer``, ``n_head``,
    ``n_embd``) that our own models keep in ``config.gpt``."""

    block_size: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    model_type: str
    arch: str = "hf"


_CONTEXT_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "seq_length")


def hf_context_length(config: Any) -> int | None:
    """The context length a ``transformers`` model config names (``n_positions`` /
    ``max_position_embeddings`` / ``n_ctx`` / ``seq_length``), None when none does."""
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _cfg_int(cfg: Any, keys: tuple[str, ...], default: int) -> int:
    for key in keys:
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


class HFCausalLM(LanguageModel):
    """A Hugging Face causal LM (plain or peft) behind our GPT's interface.

    * ``logits, loss = model(idx, targets)``: ``targets`` are already the next tokens,
      aligned with ``idx`` positions (our convention, *not* HF's ``labels`` that the
      model shifts itself); ``loss`` is the mean cross-entropy over targets that are not
      ``-100`` (``None`` without targets).
    * ``model(idx, targets, targets_only=True)``: the same loss, with the output layer run
      only where it is needed (a prompt masked with ``-100`` costs no logits); ``logits``
      is then ``(N, vocab)``, one row per target that is not ``-100`` in row-major order
      (see :func:`~neuroplastic.models.api.forward_targets`). For the model families in
      :data:`HEAD_SELECT_TYPES` a pre-hook on the output layer hands it only the target
      positions' hidden states; for others the model's ``logits_to_keep`` starts the
      output layer at the first position where some row has a target.
    * :meth:`generate` has the semantics of :meth:`GPT.generate`.
    * ``config.block_size`` (``context_length``) is :func:`hf_context_length` of the
      model's config, 2048 when it names none.
    """

    #: :func:`~neuroplastic.models.api.forward_targets` may pass ``targets_only=True``
    accepts_targets_only = True

    def __init__(self, model: nn.Module, tokenizer: Any = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        #: ``{"name", "sha256"}`` of the pretrained base under LoRA adapters (see
        #: :meth:`set_base`); a checkpoint then stores the adapters, not a copy of the base.
        self.base_ref: dict[str, str] | None = None
        self._frozen_versions: dict[str, int] = {}
        self.train(model.training)  # the wrapper starts in the model's mode
        cfg = model.config
        emb = model.get_input_embeddings()
        self.config = HFModelInfo(
            block_size=hf_context_length(cfg) or 2048,
            vocab_size=int(emb.num_embeddings),
            n_layer=_cfg_int(cfg, ("n_layer", "num_hidden_layers", "num_layers"), 0),
            n_head=_cfg_int(cfg, ("n_head", "num_attention_heads"), 0),
            n_embd=_cfg_int(cfg, ("n_embd", "hidden_size", "d_model"), int(emb.embedding_dim)),
            model_type=str(getattr(cfg, "model_type", "unknown")),
        )

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **kwargs: Any) -> HFCausalLM:
        """:func:`load_causal_lm` and wrap the result."""
        model, tokenizer = load_causal_lm(name_or_path, **kwargs)
        return cls(model, tokenizer)

    @property
    def hf_config(self) -> Any:
        return self.model.config

    def set_base(self, name: str, directory: str | Path) -> None:
        """Record the pretrained base this (LoRA) model was loaded from: ``name`` as the
        run gave it (a registry name or a path) and the sha256 of its weights
        (:func:`~neuroplastic.models.registry.base_model_fingerprint`). The in-place
        version counters of the frozen parameters are noted too, so that a checkpoint can
        tell base weights something changed (and store those) from untouched ones."""
        from neuroplastic.models.registry import base_model_fingerprint

        self.base_ref = {"name": str(name), "sha256": base_model_fingerprint(directory)}
        self._frozen_versions = {
            n: p._version for n, p in self.named_parameters() if not p.requires_grad
        }

    def changed_frozen_parameters(self) -> set[str]:
        """Names of frozen parameters modified in place since :meth:`set_base`."""
        return {
            n for n, p in self.named_parameters()
            if not p.requires_grad and self._frozen_versions.get(n, -1) != p._version
        }

    def num_params(self, non_embedding: bool = True, trainable_only: bool = False) -> int:
        """Parameters (each shared tensor once). With ``non_embedding`` position
        embeddings are left out, and the token embedding unless it is tied to the output
        projection (nanoGPT's convention, as :meth:`GPT.num_params`)."""
        seen: set[int] = set()
        n = 0
        for p in self.model.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            n += p.numel()
        if non_embedding:
            inp = self.model.get_input_embeddings()
            out = self.model.get_output_embeddings()
            tied = out is not None and out.weight is inp.weight
            if not tied and id(inp.weight) in seen:
                n -= inp.weight.numel()
            for name, mod in self.model.named_modules():
                if isinstance(mod, nn.Embedding) and mod is not inp and name.rsplit(".", 1)[-1] in (
                    "wpe", "position_embeddings", "embed_positions"
                ):
                    if id(mod.weight) in seen:
                        n -= mod.weight.numel()
        return n

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        targets_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if targets_only and targets is not None:
            mask = targets != -100
            if bool(mask.any()):
                return self._forward_targets(idx, targets, mask, attention_mask)
        out = self.model(input_ids=idx, attention_mask=attention_mask, use_cache=False)
        logits = out.logits
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100
            )
        return logits, loss

    def _forward_targets(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor,
        mask: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``targets_only``: logits ``(N, vocab)`` at the N targets (``mask``), and their
        mean loss."""
        head = self.model.get_output_embeddings()
        if head is not None and self.config.model_type in HEAD_SELECT_TYPES:
            # the output layer sees only the hidden states at the target positions; what
            # these models do to its output after it (soft-capping, scaling) is elementwise
            def select(module, args):
                return (args[0][mask], *args[1:])

            handle = head.register_forward_pre_hook(select)
            try:
                out = self.model(input_ids=idx, attention_mask=attention_mask, use_cache=False)
            finally:
                handle.remove()
            logits = out.logits
        else:
            keep = _keep_kwarg(self.model)
            kwargs: dict[str, Any] = {}
            first = int(mask.any(0).to(torch.int8).argmax())
            if keep and first > 0:
                kwargs[keep] = idx.size(1) - first
            out = self.model(input_ids=idx, attention_mask=attention_mask, use_cache=False, **kwargs)
            logits = out.logits[mask[:, idx.size(1) - out.logits.size(1):]]
        loss = F.cross_entropy(logits.float(), targets[mask])
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue ``idx`` ``(B, T)`` by up to ``max_new_tokens`` tokens: ``(B, T + new)``.

        The same semantics as :meth:`GPT.generate` (and the same sampling code):
        ``temperature=0`` is greedy, ``top_k`` / ``top_p`` filter before sampling with
        ``generator``, a row that emitted ``eos_id`` keeps emitting it and generation
        stops when all rows have. Our own loop over the model with ``past_key_values``
        (not HF's ``generate``), so a seeded ``generator`` reproduces samples exactly.
        Once the context would pass ``block_size`` the last ``block_size`` tokens are
        recomputed without the cache at every step, as in :meth:`GPT.generate`. Rows are
        not padded (all prompts have length ``T``). The model is in eval mode for the
        call and restored afterwards.
        """
        block_size = self.config.block_size
        cache_kw = _cache_kwarg(self.model)
        past = None

        def next_logits(out: torch.Tensor) -> torch.Tensor:
            nonlocal past
            if past is not None and out.size(1) <= block_size:
                ctx = out[:, -1:]  # everything before it is in the cache
            else:
                ctx = out[:, -block_size:]
                past = None
            kwargs = {cache_kw: past} if past is not None else {}
            res = self.model(input_ids=ctx, use_cache=use_cache, **kwargs)
            if use_cache:
                past = getattr(res, "cache", None)
                if past is None:
                    past = getattr(res, "past_key_values", None)
            return res.logits[:, -1]

        return generate_loop(self, idx, max_new_tokens, next_logits, temperature, top_k, top_p,
                             eos_id, generator)
