"""Model FLOPs utilisation: training FLOPs per token and the device's peak FLOP/s.

``MFU = flops_per_token * tokens_per_second / (peak * processes)``.

* FLOPs per token: the model's own ``flops_per_token(T)`` when it has one (GPT and the
  Hebbian LM: ``6 N + 12 L H Q T``, PaLM appendix B); otherwise ``4 N_all + 2 N_train``
  (forward and input-gradient matmuls over all weights, weight gradients only for the
  trainable ones: ``6 N`` for full training, less for LoRA), with ``N`` the parameters
  that do matmul work (embedding tables count only when tied to an output projection).
* Peak: ``train.peak_tflops`` when set; on CUDA the dense datasheet number of a known
  device (bf16/fp16 tensor cores with AMP, TF32 or fp32 without); otherwise (CPU, an
  unknown GPU) a *measured* peak: the best FLOP/s of a square matmul in the compute
  dtype, measured once per process. A measured peak makes MFU say how close training
  gets to this machine's own matmul speed, not to a datasheet.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

# Dense (no sparsity) datasheet peaks in TFLOP/s: label, substrings that must all be in the
# lower-cased device name (more specific first), bf16/fp16 tensor core, TF32 tensor core, fp32.
CUDA_PEAKS: list[tuple[str, tuple[str, ...], float, float | None, float]] = [
    ("H100 PCIe", ("h100", "pcie"), 756.0, 378.0, 51.0),
    ("H100 NVL", ("h100", "nvl"), 835.0, 418.0, 60.0),
    ("GH200", ("gh200",), 989.0, 494.0, 67.0),
    ("H100 SXM", ("h100",), 989.0, 494.0, 67.0),
    ("H200", ("h200",), 989.0, 494.0, 67.0),
    ("B200", ("b200",), 2250.0, 1100.0, 80.0),
    ("A100", ("a100",), 312.0, 156.0, 19.5),
    ("A10G", ("a10g",), 70.0, 35.0, 31.2),
    ("A10", ("a10",), 125.0, 62.5, 31.2),
    ("L40S", ("l40s",), 362.0, 183.0, 91.6),
    ("L4", ("l4",), 121.0, 60.0, 30.3),
    ("V100", ("v100",), 125.0, None, 15.7),  # fp16 only (no bf16, no TF32)
    ("T4", ("t4",), 65.0, None, 8.1),  # fp16 only
]


@dataclass(frozen=True)
class Peak:
    flops: float  # FLOP/s of one device
    source: str  # how it was obtained, for logs and docs


def datasheet_peak(device_name: str, dtype: torch.dtype | None, tf32: bool = False) -> Peak | None:
    """The datasheet peak of a known CUDA device for the compute ``dtype`` (None: fp32)."""
    low = device_name.lower()
    for label, keys, half, tf32_peak, fp32 in CUDA_PEAKS:
        if all(k in low for k in keys):
            if dtype in (torch.bfloat16, torch.float16):
                return Peak(half * 1e12, f"{label} datasheet dense {str(dtype).split('.')[-1]}")
            if tf32 and tf32_peak is not None:
                return Peak(tf32_peak * 1e12, f"{label} datasheet dense TF32")
            return Peak(fp32 * 1e12, f"{label} datasheet fp32")
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(
    device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024, reps: int = 5
) -> float:
    """Best FLOP/s of an ``n x n @ n x n`` matmul in ``dtype`` over ``reps`` timed runs.

    The operands come from a private generator: measuring never moves the global RNG, so a
    run's dropout and sampling (and exact resume) do not depend on whether it measured."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    best = float("inf")
    for i in range(reps + 1):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        if i:  # the first one is warmup
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / max(best, 1e-12)


_MEASURED: dict[tuple[str, str], float] = {}


def device_peak(
    device: torch.device, dtype: torch.dtype | None = None, override_tflops: float = 0.0
) -> Peak:
    """Peak FLOP/s for MFU: the override, a datasheet number, or a measured (cached) matmul peak."""
    if override_tflops > 0:
        return Peak(override_tflops * 1e12, "train.peak_tflops")
    if device.type == "cuda":
        tf32 = torch.get_float32_matmul_precision() != "highest"
        found = datasheet_peak(torch.cuda.get_device_name(device), dtype, tf32)
        if found is not None:
            return found
    compute = dtype or torch.float32
    key = (str(device), str(compute))
    if key not in _MEASURED:
        _MEASURED[key] = measure_matmul_peak(device, compute)
    name = str(compute).split(".")[-1]
    return Peak(_MEASURED[key], f"measured {name} 1024x1024 matmul on {device.type}")


def matmul_params(model: nn.Module) -> tuple[int, int]:
    """``(all, trainable)`` parameter counts of weights that do matmul work per token.

    Embedding tables are left out unless their weight is also used by a linear layer
    (tied output projection). Tied parameters count once.
    """
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    lookup = {
        id(m.weight) for m in model.modules()
        if isinstance(m, nn.Embedding) and id(m.weight) not in linear_weights
    }
    total = trainable = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen or id(p) in lookup:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return total, trainable


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) of ``model`` at sequence length ``seq_len``."""
    own = getattr(model, "flops_per_token", None)
    if callable(own):
        return float(own(seq_len))
    total, trainable = matmul_params(model)
    return float(4 * total + 2 * trainable)


def mfu(flops_token: float, tokens_per_s: float, peak: Peak, processes: int = 1) -> float:
    """Fraction of ``processes`` devices' peak that ``tokens_per_s`` (all processes) achieves."""
    return flops_token * tokens_per_s / (peak.flops * max(processes, 1))


class MfuMeter:
    """MFU of a training run's throughput: the peak and the FLOPs per token are found on
    the first call (measuring a peak takes a moment), then reused."""

    def __init__(self, model: nn.Module, seq_len: int, device: torch.device,
                 dtype: torch.dtype | None = None, peak_tflops: float = 0.0, processes: int = 1):
        self.model, self.seq_len, self.device = model, seq_len, device
        self.dtype, self.peak_tflops, self.processes = dtype, peak_tflops, processes
        self.peak: Peak | None = None
        self.flops_per_token = 0.0

    def __call__(self, tokens_per_s: float) -> float:
        """MFU of ``tokens_per_s`` (all processes together)."""
        if self.peak is None:
            self.peak = device_peak(self.device, self.dtype, self.peak_tflops)
            self.flops_per_token = flops_per_token(self.model, self.seq_len)
        return mfu(self.flops_per_token, tokens_per_s, self.peak, self.processes)
