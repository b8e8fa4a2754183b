"""Run metrics: JSONL (the source of truth), TensorBoard, and a loss-curve PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from neuroplastic.data.sources import read_jsonl
from neuroplastic.errors import UserError


class MetricsLogger:
    """Appends one JSON object per record to ``metrics.jsonl``; mirrors scalars to TensorBoard."""

    def __init__(
        self,
        run_dir: Path,
        tensorboard: bool = True,
        resume_step: int | None = None,
        resume_hint: str = "train.resume=auto",
    ):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.resume_hint = resume_hint
        if resume_step is not None and self.path.exists():
            # Drop records written after the checkpoint we resume from, so the file
            # reads like one uninterrupted run.
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=resume_step)
            except Exception:  # tensorboard missing or broken: JSONL still has everything
                self._tb = None

    def log(self, kind: str, step: int, **values: Any) -> None:
        record = {"kind": kind, "step": step, **values}
        line = json.dumps(record, default=float) + "\n"
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
        except OSError as exc:  # full disk, read-only or vanished directory
            raise UserError(
                f"Could not append to {self.path} ({exc.strerror or exc}); the run stops at "
                f"step {step}, its checkpoints are as they were. Free disk space or fix the "
                f"directory's permissions, then resume with {self.resume_hint}."
            ) from exc
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)
                elif isinstance(v, str) and kind == "sample":
                    self._tb.add_text(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    return read_jsonl(path, skip_damaged=True) if path.exists() else []  # skip a line cut by a crash


def plot_loss_curve(metrics_path: Path, png_path: Path, title: str = "") -> Path | None:
    """Train loss (per logged step) and val loss (per eval) against step."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train" and "loss" in r]
    val = [(r["step"], r["loss"]) for r in records if r.get("kind") == "eval" and "loss" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
