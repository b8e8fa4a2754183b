"""EleutherAI lm-evaluation-harness adapter: ``--model neuroplastic``.

Importing this module registers :class:`NeuroplasticLM` in lm_eval's model registry
under ``neuroplastic``, so any lm_eval task runs on our checkpoints and on Hugging Face
models with LoRA adapters::

    python -m neuroplastic.evaluation.lm_eval_adapter --model neuroplastic \\
        --model_args checkpoint=runs/tiny --tasks hellaswag --limit 100 --device cpu
    python -m neuroplastic.evaluation.lm_eval_adapter --model neuroplastic \\
        --model_args pretrained=models/qwen2.5-0.5b,adapter=runs/cot/adapter \\
        --tasks gsm8k --batch_size 8 --device cuda

(``python -m neuroplastic.evaluation.lm_eval_adapter`` is the ``lm_eval`` command line
with this model registered: lm_eval finds models by import, not by plugin.) It also
passes ``--include_path`` with our task configs
(:mod:`neuroplastic.evaluation.lm_eval_tasks`), so ``hellaswag``, ``mmlu`` and ``gsm8k``
read the local files the data registry finds (``$NEUROPLASTIC_DATA``,
``../shared/data``, ...) and never reach a hub; give your own ``--include_path`` to
replace that. From Python: ``lm_eval.simple_evaluate(model=NeuroplasticLM(checkpoint=...),
tasks=[...], task_manager=task_manager())``.

Model arguments (``--model_args`` ``key=value,...``):

* ``checkpoint=PATH``: one of our checkpoints or run directories (GPT, Hebbian LM, HF
  model trained through our trainer), a ``neuroplastic cot train`` output directory, a
  LoRA adapter directory or a Hugging Face model directory
  (:func:`neuroplastic.models.loading.load_any_model`); ``pretrained`` then names an
  adapter's base model.
* ``pretrained=DIR`` (+ ``adapter=DIR`` or ``peft=DIR``): a Hugging Face causal LM,
  optionally with LoRA adapters written by :func:`~neuroplastic.models.hf.save_adapter`.
* ``max_length`` (context window; default the model's), ``max_gen_toks`` (256),
  ``dtype`` (HF models: ``float32``, ``bfloat16``, ...); ``device`` (``cpu``,
  ``cuda``, ...; default cuda when available) and ``batch_size`` (``auto`` means 16)
  come from lm_eval's ``--device`` / ``--batch_size`` (giving them in ``--model_args``
  as well is an error in lm_eval).

The three request types:

* ``loglikelihood``: :class:`~neuroplastic.evaluation.multiple_choice` scorers (the
  ones our own ``neuroplastic evaluate --task mmlu|hellaswag`` uses): context and
  continuation tokenized separately, trailing whitespace of the context moved to the
  continuation, contexts cut from the left to the window, continuations longer than the
  window scored in rolling windows; an empty context starts from the bos/eos token.
* ``loglikelihood_rolling``: the whole text as a continuation of that start token, in
  disjoint windows of ``max_length`` targets (lm-eval's rolling windows).
* ``generate_until``: :func:`~neuroplastic.evaluation.generation.generate_until` --
  greedy unless ``do_sample``/``temperature`` say otherwise, cut before the first
  ``until`` string, at most ``max_gen_toks`` tokens.

``apply_chat_template`` works when the model's tokenizer has a chat template
(``--apply_chat_template``).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

try:
    import lm_eval.models  # noqa: F401  (built-in models first: lm_eval imports them only into an empty registry)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as exc:  # pragma: no cover
    raise ImportError(
        "neuroplastic.evaluation.lm_eval_adapter needs lm-evaluation-harness; install it with "
        "pip install 'neuroplastic[eval]'."
    ) from exc

from neuroplastic.data.tokenizers import as_tokenizer
from neuroplastic.errors import UserError
from neuroplastic.evaluation.generation import generate_until
from neuroplastic.evaluation.multiple_choice import make_scorer

__all__ = ["NeuroplasticLM", "main", "task_manager"]


def _int_or(value: Any, default: int) -> int:
    if value is None or (isinstance(value, str) and value.strip().lower().startswith("auto")):
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"batch_size must be an integer or auto, got {value!r}.") from None


@register_model("neuroplastic")
class NeuroplasticLM(LM):
    """Our models behind lm_eval's ``LM`` interface (see the module docs)."""

    def __init__(
        self,
        checkpoint: str | None = None,
        pretrained: str | None = None,
        adapter: str | None = None,
        peft: str | None = None,
        device: str | None = None,
        batch_size: int | str | None = 16,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        dtype: str | None = None,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ):
        super().__init__()
        device = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        adapter = adapter or peft
        if model is not None:
            if tokenizer is None:
                tokenizer = getattr(model, "tokenizer", None)
            if tokenizer is None:
                raise UserError("NeuroplasticLM(model=...) needs its tokenizer too.")
            self.name = type(model).__name__
        elif checkpoint is not None:
            from neuroplastic.models.loading import load_any_model

            model, tokenizer, _ = load_any_model(checkpoint, pretrained, device, dtype)
            self.name = str(checkpoint)
        elif pretrained is not None:
            from neuroplastic.models.hf import HFCausalLM, load_adapter, load_causal_lm

            hf, tokenizer = load_causal_lm(pretrained, device=device, dtype=dtype)
            if adapter:
                hf = load_adapter(hf, adapter)
            model = HFCausalLM(hf, tokenizer)
            self.name = f"{pretrained}+{adapter}" if adapter else str(pretrained)
        else:
            raise UserError(
                "The neuroplastic lm_eval model needs checkpoint=PATH or pretrained=DIR "
                "(with adapter=DIR for LoRA) in --model_args."
            )
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self._device = torch.device(device)
        self.batch_size = _int_or(batch_size, 16)
        self.max_gen_toks = int(max_gen_toks)
        self.scorer = make_scorer(self.model, tokenizer, device, self.batch_size,
                                  **({"max_length": int(max_length)} if max_length else {}))
        self.codec = as_tokenizer(tokenizer)

    # ------------------------------------------------------------------ requests

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(req.args) for req in requests]
        out = self.scorer.loglikelihood(pairs)
        for pair, res in zip(pairs, out):
            self.cache_hook.add_partial("loglikelihood", pair, res)
        return [(float(lp), bool(g)) for lp, g in out]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args
            ids = self.scorer.encode(text)
            ((lp, _),) = self.scorer.loglikelihood_tokens([([], ids)]) if ids else [(0.0, True)]
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), lp)
            out.append(float(lp))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        bar = None
        if not disable_tqdm and len(requests) > 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(requests), desc="generating", file=sys.stderr, leave=False)
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            if isinstance(until, str):
                until = [until]
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            if not kwargs.pop("do_sample", temperature > 0):
                temperature = 0.0
            top_p = kwargs.pop("top_p", None)
            top_k = kwargs.pop("top_k", None)
            text = generate_until(
                self.model, self.codec, context, max_new_tokens=max_new, until=until,
                temperature=temperature, top_p=top_p, top_k=top_k, device=self._device,
            )
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
            out.append(text)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return out

    # ------------------------------------------------------------------ chat

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", None) or self.name).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError("This model's tokenizer has no chat template; drop --apply_chat_template.")
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )


def task_manager(**kwargs: Any):
    """lm_eval's ``TaskManager`` with our local-data task configs on its include path
    (they replace the built-in ``hellaswag``, ``mmlu*`` and ``gsm8k``)."""
    from lm_eval.tasks import TaskManager

    from neuroplastic.evaluation.lm_eval_tasks import TASKS_DIR

    kwargs.setdefault("include_path", str(TASKS_DIR))
    _quiet_overrides()
    return TaskManager(**kwargs)


class _QuietOverrides:
    """Drops lm_eval's warning for each of our tasks that replaces a built-in one (63 lines
    for hellaswag + mmlu + gsm8k, all expected)."""

    def filter(self, record) -> bool:
        from neuroplastic.evaluation.lm_eval_tasks import TASKS_DIR

        msg = record.getMessage()
        # a task of ours, or a tag our tasks carry (tags have no file: "from None")
        ours = str(TASKS_DIR) in msg or "from None overrides" in msg
        return not ("overrides existing task" in msg and ours)


def _quiet_overrides() -> None:
    import logging

    logger = logging.getLogger("lm_eval.tasks._index")
    if not any(isinstance(f, _QuietOverrides) for f in logger.filters):
        logger.addFilter(_QuietOverrides())


def _with_include_path(argv: list[str]) -> list[str]:
    from neuroplastic.evaluation.lm_eval_tasks import TASKS_DIR

    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        return argv
    return [*argv, "--include_path", str(TASKS_DIR)]


def main(argv: list[str] | None = None) -> None:
    """The ``lm_eval`` command line with ``--model neuroplastic`` available and our
    local-data task configs on the include path."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *_with_include_path(list(sys.argv[1:] if argv is None else argv))]
    _quiet_overrides()
    try:
        cli_evaluate()
    except UserError as exc:
        print(f"neuroplastic: error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None


if __name__ == "__main__":
    main()
