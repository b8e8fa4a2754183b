"""Data-parallel training (torchrun, gloo on CPU): equivalence, replica identity, resume, sharding."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from neuroplastic.config import load_config
from neuroplastic.data.batching import PackedBlocks
from neuroplastic.errors import UserError
from neuroplastic.models import checkpoint_io
from neuroplastic.training import checkpoint as ckpt
from neuroplastic.training import mfu
from neuroplastic.training.distributed import ShardedBatches, shard_stream
from neuroplastic.training.metrics import read_metrics
from neuroplastic.training.trainer import Trainer
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="this PyTorch build has no torch.distributed"
)

# Traces (reward-modulated, low rank), EWC (consolidated at the curriculum's stage change),
# Hebbian (activation statistics): the three kinds of state that must agree across ranks
RULES = (
    "[{type: traces, params: '*.c_*.weight', plasticity_lr: 0.01, low_rank: true, rank: 2},"
    " {type: ewc, params: '*.weight', lam: 1000.0},"
    " {type: hebbian, params: '*.mlp.c_fc', lr: 0.001}]"
)


def _overrides(out: Path, batch: int, eval_batches: int, **extra) -> list[str]:
    vals = {
        "data.max_chars": 9000, "curriculum.stages": "[definitions, explanations]",
        "train.max_steps": 8, "train.ckpt_interval": 4, "train.eval_interval": 4,
        "train.batch_size": batch, "train.eval_batches": eval_batches,
        "plasticity.rules": RULES, "reward.interval": 2, "reward.num_prompts": 2,
        "reward.max_new_tokens": 6, "train.device": "cpu", **extra,
    }
    return tiny_overrides("synthetic", out, **vals)


def torchrun(args: list[str], nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    env.pop("NEUROPLASTIC_DEBUG", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(nproc), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def run_worker(tmp_path: Path, runs: list[dict], nproc: int = 2) -> Path:
    out = tmp_path / "results"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"out": str(out), "runs": runs}), encoding="utf-8")
    proc = torchrun([str(WORKER), str(spec)], nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _result(out: Path, name: str, rank: int) -> dict:
    return json.loads((out / f"{name}.rank{rank}.json").read_text(encoding="utf-8"))


def test_two_processes_match_one_with_double_batch_and_resume(tmp_path):
    """2 x batch 4 (gloo) == 1 x batch 8, with Traces + EWC + Hebbian + reward; ranks stay
    bit-identical after every step; a 'killed' run resumed from its step-4 checkpoint
    continues the curve exactly."""
    torch.set_num_threads(1)
    d = tmp_path
    out = run_worker(d, [
        {"name": "straight", "overrides": _overrides(d / "a", 4, 2)},
        # "killed" after step 6: only the step-4 checkpoint survives
        {"name": "part1", "overrides": _overrides(d / "b", 4, 2), "stop_at": 6},
        {"name": "part2", "overrides": _overrides(d / "b", 4, 2, **{"train.resume": "auto"})},
    ])
    ref = Trainer(load_config("tiny", _overrides(d / "ref", 8, 1)))
    ref.train()
    ref_losses = [h["loss"] for h in ref.history]

    r0, r1 = _result(out, "straight", 0), _result(out, "straight", 1)
    assert r0["world_size"] == 2 and r0["strategy"] == "ddp"
    # the loss curve of one process with the doubled batch, to fp32 rounding
    np.testing.assert_allclose(r0["losses"], ref_losses, rtol=5e-6, atol=0)
    assert r0["losses"] == r1["losses"]  # the loss is averaged over ranks before anyone reads it
    np.testing.assert_allclose(r0["last_eval"]["loss"], ref.last_eval["loss"], rtol=5e-6)
    final = load_file(str(out / "straight.safetensors"))
    for name, p in checkpoint_io.model_tensors(ref.model).items():
        torch.testing.assert_close(final[name], p, rtol=1e-4, atol=2e-6)
    # every rank: identical parameters, optimizer state, rule state and data position after every step
    assert len(r0["fingerprints"]) == 8
    for step, (f0, f1) in enumerate(zip(r0["fingerprints"], r1["fingerprints"]), 1):
        assert f0 == f1, f"ranks differ after step {step}"
    # the rules were really active
    recs = read_metrics(d / "a" / "metrics.jsonl")
    assert [r for r in recs if r["kind"] == "reward"], "no reward was computed"
    assert [r for r in recs if r["kind"] == "consolidate"], "EWC did not consolidate"
    assert any(r.get("hebbian/update_norm", 0) > 0 for r in recs if r["kind"] == "train")
    # rank 0 alone logs: one train record per step
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(1, 9))
    assert r0["tokens_seen"] == ref.tokens_seen  # global tokens
    assert r0["mfu"] is not None and r0["mfu"] > 0

    # kill and resume: rank 0 wrote the checkpoints, both ranks loaded step 4
    p1, p2 = _result(out, "part1", 0), _result(out, "part2", 0)
    assert p1["resumed_from"] is None
    for rank in (0, 1):
        assert Path(_result(out, "part2", rank)["resumed_from"]).name == ckpt.checkpoint_name(4)
    assert p1["losses"][:4] + p2["losses"] == r0["losses"]  # bitwise
    assert p2["fingerprints"][-1] == r0["fingerprints"][-1]
    assert _result(out, "part2", 1)["fingerprints"][-1] == r0["fingerprints"][-1]


def test_fsdp_matches_single_process_and_its_checkpoint_resumes_anywhere(tmp_path):
    """FSDP2 (fully_shard on gloo): same curve as one process with the doubled batch; its
    checkpoint (gathered on rank 0) resumes in a single process; rules are refused."""
    torch.set_num_threads(1)
    pytest.importorskip("torch.distributed.fsdp")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this PyTorch has no FSDP2 fully_shard")
    d = tmp_path
    plain = {"plasticity.rules": "[]", "reward.interval": 0, "train.parallel": "fsdp"}
    hebbian = {**plain, "model.arch": "hebbian", "model.window": 8, "model.chunk_size": 8,
               "train.max_steps": 3, "curriculum.stages": "[definitions]"}
    out = run_worker(d, [
        {"name": "fsdp", "overrides": _overrides(d / "a", 4, 2, **plain), "stop_at": 6},
        # the Hebbian LM to the end: its final sample runs generate() outside forward()
        {"name": "fsdp-hebbian", "overrides": _overrides(d / "h", 2, 1, **hebbian)},
    ])
    r0 = _result(out, "fsdp", 0)
    assert r0["strategy"] == "fsdp"
    samples = [r for r in read_metrics(d / "h" / "metrics.jsonl") if r["kind"] == "sample"]
    assert len(samples) == 1 and samples[0]["step"] == 3
    assert (d / "h" / "checkpoints" / ckpt.checkpoint_name(3)).is_dir()
    ref = Trainer(load_config("tiny", _overrides(d / "ref", 8, 1, **plain)))
    ref.train()
    ref_losses = [h["loss"] for h in ref.history]
    np.testing.assert_allclose(r0["losses"], ref_losses[:6], rtol=2e-5)
    # the step-4 checkpoint, written by FSDP, continues in one process with the doubled batch
    resumed = Trainer(load_config("tiny", _overrides(
        d / "a", 8, 1, **{**plain, "train.parallel": "auto", "train.resume": "auto"})))
    resumed.train()
    assert resumed.resumed_from.name == ckpt.checkpoint_name(4)
    np.testing.assert_allclose([h["loss"] for h in resumed.history], ref_losses[4:], rtol=1e-4)


def test_fsdp_with_plasticity_rules_is_a_clear_error(tmp_path):
    proc = torchrun(["-m", "neuroplastic", "train", "tiny",
                     *_overrides(tmp_path / "a", 2, 1, **{"train.parallel": "fsdp"})])
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("neuroplastic: error:")]
    assert errors and all("not supported with train.parallel=fsdp" in ln for ln in errors)
    # one sentence, exit code 2, no traceback from our code (torchrun prints its own summary)
    assert "exitcode  : 2" in proc.stderr
    assert str(ROOT / "src" / "neuroplastic") not in proc.stderr


@pytest.mark.slow
def test_torchrun_cli_sigterm_then_resume_continues_the_curve(tmp_path):
    """The real command: `torchrun -m neuroplastic train`, stopped with SIGTERM (every rank
    stops after the same step and rank 0 saves), resumed with --resume, equals an
    uninterrupted run."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    over = lambda out: _overrides(out, 2, 1, **{  # noqa: E731
        "train.max_steps": 40, "train.ckpt_interval": 4, "train.eval_interval": 20})
    full = torchrun(["-m", "neuroplastic", "train", "tiny", *over(tmp_path / "full")], timeout=500)
    assert full.returncode == 0, full.stderr[-3000:]
    assert full.stdout.count("run dir:") == 1  # rank 0 alone prints
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "neuroplastic", "train", "tiny", *over(tmp_path / "cut")]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    ckpts = tmp_path / "cut" / "checkpoints"
    deadline = time.time() + 300
    while not (ckpts / ckpt.checkpoint_name(8)).is_dir() and time.time() < deadline:
        time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both workers
    stdout, _ = proc.communicate(timeout=300)
    assert stdout.count("Stopped at step") == 1, stdout  # both stopped at one step, rank 0 reports
    stopped = checkpoint_io.latest_checkpoint(ckpts)
    assert stopped is not None and stopped.name != ckpt.checkpoint_name(40), "SIGTERM came too late"
    again = torchrun(["-m", "neuroplastic", "train", "tiny", *over(tmp_path / "cut"), "train.resume=auto"],
                     timeout=500)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout

    def losses(run: str) -> list[float]:
        recs = read_metrics(tmp_path / run / "metrics.jsonl")
        return [r["loss"] for r in recs if r["kind"] == "train"]

    assert losses("cut") == losses("full")


# ---------------------------------------------------------------------------- data sharding


def test_sharded_batches_split_the_global_batch_without_overlap_or_loss():
    tokens = np.arange(2000, dtype=np.int32)
    whole = PackedBlocks(tokens, 16, 6, seed=3)
    ranks = [ShardedBatches(PackedBlocks(tokens, 16, 6, seed=3), r, 3) for r in range(3)]
    for _ in range(30):  # crosses epoch boundaries (124 blocks, 6 per batch)
        gx, gy = whole.next_batch()
        parts = [s.next_batch() for s in ranks]
        assert all(x.shape == (2, 16) for x, _ in parts)
        torch.testing.assert_close(torch.cat([x for x, _ in parts]), gx)
        torch.testing.assert_close(torch.cat([y for _, y in parts]), gy)
    assert all(s.state_dict() == whole.state_dict() for s in ranks)  # one data position for all
    assert ranks[0].epoch == whole.epoch and ranks[0].batch_size == 2
    with pytest.raises(UserError, match="does not split"):
        ShardedBatches(PackedBlocks(tokens, 16, 5), 0, 2)


def _hf_examples(n: int) -> list[dict]:
    return [{"text": f"document {i}", "id": i} for i in range(n)]


@pytest.mark.parametrize("num_shards", [4, 3], ids=["shards-divisible", "shards-not-divisible"])
def test_streaming_hf_dataset_split_by_node_no_overlap_no_loss(num_shards):
    datasets = pytest.importorskip("datasets")
    data = _hf_examples(23)
    stream = datasets.Dataset.from_list(data).to_iterable_dataset(num_shards=num_shards)
    assert isinstance(stream, datasets.IterableDataset)
    seen = [[ex["id"] for ex in shard_stream(stream, rank, 2)] for rank in range(2)]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(23))
    assert seen[0] and seen[1]


def test_shard_stream_map_dataset_and_plain_iterables():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(_hf_examples(10))
    parts = [[ex["id"] for ex in shard_stream(ds, r, 3)] for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(10)) and all(parts)
    assert len(set(parts[0]) | set(parts[1]) | set(parts[2])) == 10
    gen_parts = [list(shard_stream((i for i in range(11)), r, 2)) for r in range(2)]
    assert gen_parts == [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9]]
    assert list(shard_stream([1, 2], 0, 1)) == [1, 2]
    with pytest.raises(UserError, match="outside"):
        shard_stream([1], 2, 2)


# ---------------------------------------------------------------------------- MFU


def test_mfu_pieces():
    from neuroplastic.config import ModelConfig
    from neuroplastic.models import build_model

    gpt = build_model(ModelConfig.from_flat(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))
    assert mfu.flops_per_token(gpt, 16) == gpt.flops_per_token(16)
    lin = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    lin[2].weight.requires_grad_(False)
    lin[2].bias.requires_grad_(False)
    total, trainable = mfu.matmul_params(lin)  # the lookup table does no matmul work
    assert (total, trainable) == (15 + 8, 15)
    assert mfu.flops_per_token(lin, 8) == 4 * 23 + 2 * 15
    peak = mfu.datasheet_peak("NVIDIA H100 80GB HBM3", torch.bfloat16)
    assert peak.flops == 989e12 and "H100 SXM" in peak.source
    assert mfu.datasheet_peak("NVIDIA H100 PCIe", torch.bfloat16).flops == 756e12
    assert mfu.datasheet_peak("NVIDIA A100-SXM4-80GB", None).flops == 19.5e12
    assert mfu.datasheet_peak("Some Future GPU", torch.bfloat16) is None
    assert mfu.device_peak(torch.device("cpu"), None, override_tflops=2.0).flops == 2e12
    measured = mfu.device_peak(torch.device("cpu"))
    assert measured.flops > 1e8 and "measured" in measured.source
    assert mfu.mfu(100.0, 10.0, mfu.Peak(1000.0, "x"), processes=2) == 0.5


def test_single_process_trainer_reports_mfu(text_file, tmp_path):
    torch.set_num_threads(1)
    lines: list[str] = []
    t = Trainer(load_config("tiny", tiny_overrides(text_file, tmp_path / "a", **{"train.max_steps": 3})),
                echo=lines.append)
    summary = t.train()
    assert 0 < summary["mfu"] < 1.5 and summary["tokens_per_s"] > 0
    assert any(line.startswith("throughput:") and "MFU" in line for line in lines)
    recs = [r for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if r["kind"] == "train"]
    assert all(r["mfu"] > 0 for r in recs)
    assert not t.dist.enabled


# ---------------------------------------------------------------------------- GPU fast path

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_fast_path_bf16_fused_adamw(text_file, tmp_path):
    t = Trainer(load_config("tiny", tiny_overrides(
        text_file, tmp_path / "a", **{"train.device": "cuda", "train.max_steps": 2}))).setup()
    assert t.amp == torch.bfloat16
    assert all(g.get("fused") for g in t.optimizer.param_groups)
    summary = t.train()
    assert summary["mfu"] is not None and summary["mfu"] > 0


@cuda
def test_cuda_flash_sdpa_runs_the_gpt():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from neuroplastic.config import ModelConfig
    from neuroplastic.models import build_model

    m = build_model(ModelConfig.from_flat(vocab_size=256, block_size=128, n_layer=2, n_head=4, n_embd=128)).cuda()
    x = torch.randint(0, 256, (2, 128), device="cuda")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = m(x, x)
    loss.backward()
    assert torch.isfinite(loss)


@cuda
def test_cuda_compiled_chunked_fast_weight_matches_eager():
    from neuroplastic.ops.fast_weight import fast_weight_chunked

    g = torch.Generator(device="cuda").manual_seed(0)
    B, H, T, D = 2, 2, 256, 32
    q, k, v = (torch.randn(B, H, T, D, device="cuda", generator=g) * 0.3 for _ in range(3))
    log_decay = -torch.rand(B, H, T, device="cuda", generator=g) * 0.1
    eager, _ = fast_weight_chunked(q, k, v, log_decay, chunk_size=64)
    compiled = torch.compile(fast_weight_chunked)  # default mode: no CUDA graphs
    out, _ = compiled(q, k, v, log_decay, chunk_size=64)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


def test_rank_device_placement():
    from neuroplastic.training.distributed import Distributed, rank_device

    one = Distributed()
    assert rank_device(torch.device("cpu"), one) == torch.device("cpu")
    two = Distributed(rank=1, world_size=2, local_rank=1, backend="nccl", strategy="ddp")
    assert rank_device(torch.device("cpu"), two) == torch.device("cpu")
    with pytest.raises(UserError, match="same GPU"):
        rank_device(torch.device("cuda", 0), two)
    if torch.cuda.device_count() >= 2:
        assert rank_device(torch.device("cuda"), two) == torch.device("cuda", 1)
    else:
        with pytest.raises(UserError, match="has no GPU"):
            rank_device(torch.device("cuda"), two)
