"""The evaluation task registry: a new task is one entry, run by ``neuroplastic evaluate --task``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from neuroplastic.cli import main
from neuroplastic.config import RunConfig, dump_config
from neuroplastic.data.tokenizers import ByteTokenizer
from neuroplastic.errors import UserError
from neuroplastic.evaluation.tasks import TASKS, EvalTask, get_task, register
from neuroplastic.models import build_model
from neuroplastic.training import checkpoint as ckpt


def _tiny_checkpoint(directory: Path) -> tuple[Path, int]:
    """A one-layer GPT checkpoint and its parameter count."""
    tok = ByteTokenizer()
    cfg = RunConfig()
    cfg.model.gpt.n_layer, cfg.model.gpt.n_head, cfg.model.gpt.n_embd, cfg.model.block_size = 1, 1, 16, 32
    cfg.model.vocab_size = tok.vocab_size
    model = build_model(cfg.model)
    ckpt.save_checkpoint(directory, model=model, state={"step": 0}, config_text=dump_config(cfg),
                         tokenizer=tok)
    return directory, sum(p.numel() for p in model.parameters())


def _param_count(loaded, options) -> dict:
    n = sum(p.numel() for p in loaded.model.parameters())
    return {"checkpoint": str(loaded.directory), "params": n, "limit": options.limit}


def _format_param_count(result: dict, options) -> list[str]:
    return [f"checkpoint: {result['checkpoint']}", f"parameters: {result['params']:,}"]


@pytest.fixture
def param_count_task():
    task = register(EvalTask("param-count", "the model's parameter count", _param_count,
                             _format_param_count, to_json=lambda r: {"params": r["params"]}))
    yield task
    del TASKS["param-count"]


def test_a_registered_task_runs_through_the_cli(tmp_path, capsys, param_count_task):
    path, n = _tiny_checkpoint(tmp_path / "ckpt")
    assert main(["evaluate", str(path), "--task", "param-count", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"checkpoint: {path}", f"parameters: {n:,}"]
    assert main(["evaluate", str(path), "--task", "param-count", "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"params": n}


def test_task_options_are_checked_before_loading(capsys, param_count_task):
    # the checkpoint does not exist: the option error must come first
    assert main(["evaluate", "no/such/dir", "--task", "param-count", "--batch-size", "0"]) == 2
    assert "--batch-size must be a positive integer" in capsys.readouterr().err


def test_unknown_and_duplicate_tasks():
    with pytest.raises(SystemExit):
        main(["evaluate", "x", "--task", "param-count"])
    with pytest.raises(UserError, match="did you mean mmlu"):
        get_task("mmlv")
    with pytest.raises(ValueError, match="already registered"):
        register(TASKS["lm"])
    assert list(TASKS)[:2] == ["lm", "wikitext2"]
