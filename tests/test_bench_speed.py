"""benchmarks/vs_nanogpt.py and fast_weight.py --vs-fla end to end at tiny sizes (CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import fast_weight as fw_bench  # noqa: E402
import hf_output_layer  # noqa: E402
import vs_nanogpt  # noqa: E402

# a stand-in for nanoGPT's model.py with its interface (GPTConfig, GPT(config), forward ->
# (logits, loss)); the real file is fetched by the benchmark and never committed
FAKE_NANOGPT = '''
from dataclasses import dataclass
import torch, torch.nn as nn, torch.nn.functional as F

@dataclass
class GPTConfig:
    block_size: int = 16
    vocab_size: int = 65
    n_layer: int = 1
    n_head: int = 1
    n_embd: int = 8
    dropout: float = 0.0
    bias: bool = False

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size)

    def forward(self, idx, targets=None):
        logits = self.head(self.wte(idx))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
'''


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_vs_nanogpt_tiny_prints_the_ratio_table(tmp_path, capsys):
    path = tmp_path / "model.py"
    path.write_text(FAKE_NANOGPT)
    assert vs_nanogpt.main(["--tiny", "--nanogpt", str(path), "--modes", "eager",
                            "--rounds", "2", "--steps", "1", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| tiny | eager |")]
    assert len(rows) == 2  # the row as it finishes, then the table
    cells = rows[-1].split("|")
    assert "x)" in cells[4] and "x)" in cells[5]  # ours-matched, ours-default ratios
    assert "load avg" in out


def test_vs_nanogpt_halves_adds_a_fourth_model_column(tmp_path, capsys):
    path = tmp_path / "model.py"
    path.write_text(FAKE_NANOGPT)
    assert vs_nanogpt.main(["--tiny", "--nanogpt", str(path), "--modes", "eager", "--halves",
                            "--rounds", "2", "--steps", "1", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "ours-halves tok/s (ratio)" in out
    row = [line for line in out.splitlines() if line.startswith("| tiny | eager |")][-1]
    cells = row.split("|")
    assert all("x)" in cells[i] for i in (4, 5, 6)) and "/" in cells[7]


def test_vs_nanogpt_torch_forms_adds_the_kernel_free_default(tmp_path, capsys):
    from neuroplastic.ops.native import native_ops

    path = tmp_path / "model.py"
    path.write_text(FAKE_NANOGPT)
    with pytest.raises(SystemExit, match="--modes eager"):
        vs_nanogpt.main(["--tiny", "--nanogpt", str(path), "--torch-forms"])
    if native_ops() is None:
        pytest.skip("the native CPU kernels could not be built here")
    assert vs_nanogpt.main(["--tiny", "--nanogpt", str(path), "--modes", "eager", "--torch-forms",
                            "--rounds", "2", "--steps", "1", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "ours-default on PyTorch forms tok/s (ratio)" in out
    row = [line for line in out.splitlines() if line.startswith("| tiny | eager |")][-1]
    assert all("x)" in row.split("|")[i] for i in (4, 5, 6))


def test_vs_nanogpt_missing_file_exits(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        vs_nanogpt.main(["--tiny", "--nanogpt", str(tmp_path / "nope.py")])


def test_fast_weight_vs_fla_on_cpu_times_our_forms_and_skips_fla(capsys):
    assert fw_bench.main(["--vs-fla", "--fla-shape", "1,2,40,8", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for form in ("hebbian torch fp32", "hebbian torch bf16", "delta torch fp32", "delta torch bf16"):
        assert any(line.startswith(form) and "median" in line for line in out.splitlines()), form
    assert "hebbian fla-path bf16" in out and "skipped" in out


def test_hf_output_layer_tiny_times_both_arms_with_equal_losses(capsys):
    """The targets-only arm and the all-positions arm train the same LoRA model on the
    same cot batches; the table shows both, and their losses on the first batch agree."""
    assert hf_output_layer.main(["--model", "tiny", "--steps", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line.split("|")[2:5] for line in out.splitlines()
            if line.startswith("| all positions") or line.startswith("| targets only")}
    assert rows.keys() == {"all positions", "targets only"}
    assert rows["all positions"][2].strip() == rows["targets only"][2].strip()
    assert "of the positions on average" in out
