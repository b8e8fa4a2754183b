"""What the gradient trainer reports besides its step records: the data-parallel setup,
model FLOPs utilisation and the plasticity engine's statistics on the ``train`` log lines,
the progress bar's postfix, the throughput line at the end of a run, and the loss curve."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from neuroplastic.training.distributed import Distributed
from neuroplastic.training.metrics import plot_loss_curve
from neuroplastic.training.mfu import MfuMeter


class Report:
    """The reporting of one gradient run (MFU is measured on the main process only)."""

    def __init__(self, model: torch.nn.Module, block_size: int, device: torch.device,
                 amp: torch.dtype | None, peak_tflops: float, dist: Distributed, engine: Any,
                 echo: Callable[[str], None]):
        self.mfu = MfuMeter(model, block_size, device, amp, peak_tflops, dist.world_size)
        self.dist, self.engine, self.echo = dist, engine, echo

    def data_parallel(self, batch_size: int) -> None:
        """Echo the data-parallel group and the global batch (nothing for one process)."""
        if self.dist.enabled:
            self.echo(
                f"data parallel: {self.dist.world_size} processes ({self.dist.strategy}, "
                f"{self.dist.backend}), global batch {batch_size * self.dist.world_size}"
            )

    def log_extras(self, tokens_per_s: float) -> dict[str, Any]:
        """Extra keys of a ``train`` log line: ``mfu`` and the engine's ``stats()``."""
        extras: dict[str, Any] = {}
        if self.dist.is_main:
            extras["mfu"] = self.mfu(tokens_per_s)
        if self.engine is not None:
            extras.update(self.engine.stats())
        return extras

    @staticmethod
    def postfix(record: dict[str, Any]) -> dict[str, str]:
        """The progress bar's postfix of a logged record."""
        return {"loss": f"{record['loss']:.4f}", "tok_s": f"{record['tokens_per_s']:,.0f}",
                "mfu": f"{record['mfu']:.1%}"}

    def throughput(self, tokens: int, elapsed_s: float, stepped: bool) -> tuple[float, float | None]:
        """``(tokens/s, MFU)`` of a ``train()`` call that consumed ``tokens`` (all processes)
        in ``elapsed_s``; MFU is None on other processes and when no step ran (``stepped``).
        The main process echoes them."""
        tps = tokens / max(elapsed_s, 1e-9)
        run_mfu = self.mfu(tps) if self.dist.is_main and stepped else None
        if run_mfu is not None:
            self.echo(
                f"throughput: {tps:,.0f} tokens/s over {self.dist.world_size} process(es), "
                f"MFU {run_mfu:.1%} (peak: {self.mfu.peak.source})"
            )
        return tps, run_mfu

    def loss_curve(self, metrics_path: Path, run_dir: Path, title: str) -> Path | None:
        """``run_dir/loss_curve.png`` from ``metrics.jsonl`` (main process only)."""
        if not self.dist.is_main:
            return None
        return plot_loss_curve(metrics_path, run_dir / "loss_curve.png", title)
