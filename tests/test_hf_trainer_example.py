"""examples/hf_trainer_callback.py (the docs' copy-paste Trainer example) runs as shown.

docs/HF_TRAINER.md shows this file's output on SmolLM2-135M-Instruct; here the same code
runs on a tiny random Qwen2 built from a config, so the example cannot rot.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from neuroplastic.data.cot import synthetic_arithmetic  # noqa: E402
from neuroplastic.recipes.cot_app import make_tiny_model  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_trainer_callback.py"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def load_example():
    spec = importlib.util.spec_from_file_location("hf_trainer_callback", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_docs_trainer_example_runs_ewc_and_hebbian_on_lora(tmp_path, capsys):
    texts = [f"{e.question}\n{e.answer}" for e in
             synthetic_arithmetic(150, 1, "arith-mul") + synthetic_arithmetic(150, 1, "arith")]
    model = make_tiny_model(tmp_path / "tiny", texts, vocab_size=400, hidden=32, max_positions=256)
    res = load_example().main([str(model), "--task-a", "arith-mul", "--steps", "2",
                               "--batch-size", "2", "--cpu", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert all(math.isfinite(res[k]) for k in ("before", "after_a", "after_b"))
    phases = [p for p, _ in res["history"]]
    assert phases == ["A", "A", "B", "B"]
    a_logs = [h for p, h in res["history"] if p == "A"]
    b_logs = [h for p, h in res["history"] if p == "B"]
    # EWC: no penalty before the consolidation, one task consolidated and a penalty in task B
    assert all(h["plasticity/ewc/penalty"] == 0 and h["plasticity/ewc/tasks"] == 0 for h in a_logs)
    assert all(h["plasticity/ewc/tasks"] == 1 for h in b_logs)
    assert b_logs[-1]["plasticity/ewc/penalty"] > 0 and res["penalty"] > 0
    # Hebbian acts on the LoRA down-projections every step
    assert all(h["plasticity/hebbian/update_norm"] > 0 for _, h in res["history"])
    assert "held-out task-A loss: before" in out and "forgetting" in out
    assert out.count("task B step") == 2


def test_the_docs_show_the_example_file_verbatim():
    docs = (EXAMPLE.parents[1] / "docs" / "HF_TRAINER.md").read_text(encoding="utf-8")
    block = docs.split("```python\n", 1)[1].split("\n```", 1)[0]
    assert block.rstrip() == EXAMPLE.read_text(encoding="utf-8").rstrip()
