from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

SAMPLE_TEXT = (
    "The heart is an organ that pumps blood through the body. "
    "Mars is a planet with a thin atmosphere and two small moons. "
    "Water boils at one hundred degrees Celsius at sea level. "
    "A triangle has three sides and its angles add up to one hundred eighty degrees. "
) * 40


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(SAMPLE_TEXT, encoding="utf-8")
    return p


def tiny_overrides(data: Path | str, out: Path, **extra) -> list[str]:
    """Overrides that make the `tiny` recipe run in about a second on CPU."""
    vals = {
        "data.source": str(data),
        "model.n_layer": 2,
        "model.n_head": 2,
        "model.n_embd": 32,
        "model.block_size": 32,
        "train.batch_size": 4,
        "train.max_steps": 8,
        "train.warmup_steps": 2,
        "train.eval_interval": 4,
        "train.eval_batches": 2,
        "train.ckpt_interval": 4,
        "train.log_interval": 1,
        "train.sample_tokens": 8,
        "train.progress": False,
        "train.tensorboard": False,
        "train.out_dir": str(out),
    }
    vals.update(extra)
    return [f"{k}={v}" for k, v in vals.items()]


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("NEUROPLASTIC_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "neuroplastic", *args],
        capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env,
    )


def wait_for_checkpoint(proc: subprocess.Popen, ckpts: Path, timeout: float = 300) -> Path:
    """Wait until run ``proc`` has written a checkpoint into ``ckpts``; return it."""
    import time

    from neuroplastic.models import checkpoint_io

    deadline = time.time() + timeout
    while (latest := checkpoint_io.latest_checkpoint(ckpts)) is None:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    return latest


def kill_at_first_checkpoint(proc: subprocess.Popen, ckpts: Path) -> int:
    """kill -9 run ``proc`` once it has a checkpoint; the step of the newest one it left."""
    from neuroplastic.models import checkpoint_io

    wait_for_checkpoint(proc, ckpts)
    proc.kill()
    proc.communicate(timeout=60)
    return int(checkpoint_io.latest_checkpoint(ckpts).name[5:])


@pytest.fixture
def one_thread():
    """One torch thread for the test (tiny models: more threads only add contention)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
