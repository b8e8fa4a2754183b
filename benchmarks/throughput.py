"""Training throughput (tokens/s) and model FLOPs utilisation of the GPT, eager vs compiled.

One train step is what :class:`neuroplastic.training.trainer.Trainer` does per step:
forward with targets (under autocast when AMP is on), backward, gradient clipping,
AdamW step (``build_optimizer``: fused on CUDA and CPU, learning rate set from
``lr_at``) and ``zero_grad``, on random tokens. As in the trainer, ``torch.compile``
wraps the model only; the optimizer step stays eager. Warmup steps (which include the
compilation) are not timed. Both modes of one size are measured in the same run, each on
a fresh model built from the same seed; the timed steps are split into chunks and
tokens/s is the median chunk. On CPU (a shared, noisy machine is common) the eager and
compiled chunks alternate so that load from elsewhere hits both alike; on CUDA the modes
run one after the other to keep only one model in memory (``--interleave``).

MFU = ``model.flops_per_token(T) * tokens/s / peak``. On CUDA the peak is the dense
datasheet number for the device (bf16/fp16 with AMP, otherwise fp32 or TF32); on CPU
it is *measured*: the best FLOP/s of a large matmul in the compute dtype on the same
threads, so CPU MFU says how close training gets to this machine's own matmul speed.

    python benchmarks/throughput.py                  # tiny + small on CPU; + medium, seed on CUDA
    python benchmarks/throughput.py --quick          # smoke run: tiny only, a few steps
    python benchmarks/throughput.py --write-docs     # also update docs/BENCHMARKS.md and
                                                     # docs/throughput.png
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from neuroplastic.config import ModelConfig, TrainConfig
from neuroplastic.errors import UserError
from neuroplastic.models.transformer import GPT
from neuroplastic.runtime import amp_dtype, resolve_device
from neuroplastic.training.mfu import CUDA_PEAKS  # the datasheet table the trainer uses too
from neuroplastic.training.optim import build_optimizer, lr_at

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "BENCHMARKS.md"
PLOT = ROOT / "docs" / "throughput.png"
SECTION = "## Training throughput (benchmarks/throughput.py)"


# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    model: dict
    batch_cpu: int
    batch_cuda: int
    gpu_only: bool = False


PRESETS: dict[str, Preset] = {
    # the `tiny` recipe (byte-level vocabulary)
    "tiny": Preset(
        dict(n_layer=4, n_embd=128, n_head=4, block_size=128, vocab_size=256),
        batch_cpu=16,
        batch_cuda=64,
    ),
    # vocabulary of the default BPE size (data.bpe_vocab_size)
    "small": Preset(
        dict(n_layer=6, n_embd=384, n_head=6, block_size=256, vocab_size=2048),
        batch_cpu=8,
        batch_cuda=32,
    ),
    # GPT-2 vocabulary from here on
    "medium": Preset(
        dict(n_layer=12, n_embd=768, n_head=12, block_size=512, vocab_size=50257),
        batch_cpu=1,
        batch_cuda=16,
        gpu_only=True,
    ),
    "seed": Preset(
        dict(n_layer=24, n_embd=2048, n_head=16, block_size=1024, vocab_size=50257),
        batch_cpu=1,
        batch_cuda=8,
        gpu_only=True,
    ),
}



# --------------------------------------------------------------------------- machine


def machine_info(device: torch.device) -> dict[str, str]:
    from _machine import cpu_cores, cpu_model

    info = {
        "cpu": f"{cpu_model()} ({cpu_cores()} cores, {torch.get_num_threads()} torch threads)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }
    if hasattr(os, "getloadavg"):
        info["load avg at start"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = str(torch.version.cuda)
    return info


def cuda_peak(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """Datasheet peak FLOP/s for ``dtype`` on ``device`` and a description, or None."""
    name = torch.cuda.get_device_name(device)
    low = name.lower()
    for label, keys, half, tf32, fp32 in CUDA_PEAKS:
        if all(k in low for k in keys):
            if dtype in (torch.bfloat16, torch.float16):
                return half * 1e12, f"{label} datasheet dense {str(dtype).split('.')[-1]}"
            if torch.get_float32_matmul_precision() != "highest" and tf32 is not None:
                return tf32 * 1e12, f"{label} datasheet dense TF32"
            return fp32 * 1e12, f"{label} datasheet fp32"
    return None, f"unknown (no datasheet peak for {name!r})"


def measure_matmul_peak(
    device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 10
) -> float:
    """Best FLOP/s of an ``n x n @ n x n`` matmul in ``dtype`` over ``reps`` runs."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(reps + 2):
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        if i >= 2:  # the first two are warmup
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- measurement


@dataclass
class Result:
    size: str
    mode: str  # eager | compiled
    params: int
    batch: int
    seq: int
    tokens_per_s: float  # median over the timed chunks
    ms_per_step: float
    flops_per_s: float
    mfu: float | None
    chunk_rates: list[float]
    compile_s: float | None = None
    peak_mem_gib: float | None = None


class Runner:
    """One model + optimizer in one mode, stepping exactly like the trainer."""

    def __init__(
        self,
        size: str,
        mode: str,
        cfg: ModelConfig,
        batch: int,
        device: torch.device,
        amp: torch.dtype | None,
    ):
        self.size, self.mode, self.cfg, self.batch = size, mode, cfg, batch
        self.device, self.amp = device, amp
        torch.manual_seed(0)
        self.model = GPT(cfg).to(device)
        self.model.train()
        self.tc = TrainConfig(max_steps=10_000, warmup_steps=10)
        self.opt = build_optimizer(self.model, self.tc, device)
        self.fwd = torch.compile(self.model) if mode == "compiled" else self.model
        gen = torch.Generator(device="cpu").manual_seed(1)
        # a few pre-made batches on the device, cycled, so timing excludes data work
        self.pool = [
            torch.randint(0, cfg.vocab_size, (batch, cfg.block_size + 1), generator=gen).to(device)
            for _ in range(4)
        ]
        self.scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
        self.step = 0
        self.compile_s: float | None = None
        self.rates: list[float] = []
        self.times: list[tuple[int, float]] = []

    def _autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp)

    def train_step(self) -> None:
        data = self.pool[self.step % len(self.pool)]
        x, y = data[:, :-1], data[:, 1:]
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, self.tc)
        with self._autocast():
            _, loss = self.fwd(x, y)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1

    @property
    def label(self) -> str:
        return f"{self.size} {self.mode}"

    def warmup(self, n: int, bar) -> None:
        """``n`` untimed steps; the first compiled one is the compilation (timed apart)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        for i in range(n):
            compiling = self.mode == "compiled" and i == 0
            bar.set_description(f"{self.label} ({'compiling' if compiling else 'warmup'})")
            sync(self.device)
            t0 = time.perf_counter()
            self.train_step()
            sync(self.device)
            if compiling:
                self.compile_s = time.perf_counter() - t0
            bar.update(1)

    def timed_chunk(self, n: int, bar) -> None:
        bar.set_description(self.label)
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(n):
            self.train_step()
        sync(self.device)
        dt = time.perf_counter() - t0
        self.times.append((n, dt))
        self.rates.append(n * self.batch * self.cfg.block_size / dt)
        bar.update(n)

    def result(self, peak: float | None) -> Result:
        T = self.cfg.block_size
        tps = statistics.median(self.rates)
        achieved = self.model.flops_per_token(T) * tps
        mem = None
        if self.device.type == "cuda":
            mem = torch.cuda.max_memory_allocated(self.device) / 2**30
        return Result(
            size=self.size,
            mode=self.mode,
            params=self.model.num_params(),
            batch=self.batch,
            seq=T,
            tokens_per_s=tps,
            ms_per_step=1000 * self.batch * T / tps,
            flops_per_s=achieved,
            mfu=achieved / peak if peak else None,
            chunk_rates=list(self.rates),
            compile_s=self.compile_s,
            peak_mem_gib=mem,
        )


def chunk_sizes(steps: int, chunks: int) -> list[int]:
    return [n for c in range(chunks) if (n := steps // chunks + (c < steps % chunks))]


def measure_size(
    size: str,
    modes: list[str],
    cfg: ModelConfig,
    batch: int,
    device: torch.device,
    amp: torch.dtype | None,
    warmup: int,
    steps: int,
    chunks: int,
    interleave: bool,
    peak: float | None,
    bar,
) -> list[Result]:
    """All modes of one size. Interleaved: both models live at once and their timed chunks
    alternate (order flipped every chunk), so machine noise hits both alike; otherwise one
    mode after the other (half the memory)."""
    results = []
    if interleave:
        runners = [Runner(size, m, cfg, batch, device, amp) for m in modes]
        for r in runners:
            r.warmup(warmup, bar)
        for c, n in enumerate(chunk_sizes(steps, chunks)):
            for r in runners if c % 2 == 0 else runners[::-1]:
                r.timed_chunk(n, bar)
        results = [r.result(peak) for r in runners]
    else:
        for m in modes:
            r = Runner(size, m, cfg, batch, device, amp)
            r.warmup(warmup, bar)
            for n in chunk_sizes(steps, chunks):
                r.timed_chunk(n, bar)
            results.append(r.result(peak))
            del r
            free_memory(device)
    return results


def free_memory(device: torch.device) -> None:
    """Drop compiled graphs and cached memory between measurements."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- report


def fmt_si(x: float, unit: str = "") -> str:
    for div, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def results_table(results: list[Result], device: torch.device) -> str:
    cols = [
        "size", "params", "batch x seq", "mode", "tokens/s", "chunk min-max",
        "ms/step", "FLOP/s", "MFU",
    ]  # fmt: skip
    if device.type == "cuda":
        cols.append("peak mem GiB")
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in results:
        row = [
            r.size,
            f"{r.params / 1e6:.1f}M",
            f"{r.batch} x {r.seq}",
            r.mode,
            f"{r.tokens_per_s:,.0f}",
            f"{min(r.chunk_rates):,.0f}-{max(r.chunk_rates):,.0f}",
            f"{r.ms_per_step:,.1f}",
            fmt_si(r.flops_per_s),
            f"{100 * r.mfu:.1f}%" if r.mfu is not None else "unknown",
        ]
        if device.type == "cuda":
            row.append(f"{r.peak_mem_gib:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def ratio_table(results: list[Result]) -> str:
    """compiled / eager per size (sizes measured in both modes only)."""
    eager = {r.size: r for r in results if r.mode == "eager"}
    comp = {r.size: r for r in results if r.mode == "compiled"}
    sizes = [s for s in eager if s in comp]
    if not sizes:
        return ""
    lines = [
        "| size | eager tokens/s | compiled tokens/s | compiled / eager | first compiled step s |",
        "|---|---|---|---|---|",
    ]
    for s in sizes:
        e, c = eager[s], comp[s]
        lines.append(
            f"| {s} | {e.tokens_per_s:,.0f} | {c.tokens_per_s:,.0f} | "
            f"**{c.tokens_per_s / e.tokens_per_s:.2f}x** | {c.compile_s:.1f} |"
        )
    return "\n".join(lines)


def plot(results: list[Result], path: Path, title: str) -> None:
    """One panel per size (own y axis, sizes differ by orders of magnitude): tokens/s of
    each mode, labelled with the value, the compiled/eager ratio in the panel title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(r.size for r in results))
    modes = [m for m in ("eager", "compiled") if any(r.mode == m for r in results)]
    by = {(r.size, r.mode): r for r in results}
    colors = {"eager": "#4C72B0", "compiled": "#DD8452"}
    fig, axes = plt.subplots(
        1, len(sizes), figsize=(max(5.5, 0.8 + 2.4 * len(sizes)), 4.2), squeeze=False
    )
    for ax, size in zip(axes[0], sizes):
        present = [m for m in modes if (size, m) in by]
        ys = [by[(size, m)].tokens_per_s for m in present]
        bars = ax.bar(present, ys, 0.6, color=[colors[m] for m in present])
        for bar_, y in zip(bars, ys):
            ax.annotate(
                f"{y:,.0f}",
                (bar_.get_x() + bar_.get_width() / 2, y),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 2),
                textcoords="offset points",
            )
        r0 = by.get((size, modes[0]))
        sub = f"{size} ({r0.params / 1e6:.1f}M, {r0.batch}x{r0.seq})" if r0 else size
        if (size, "eager") in by and (size, "compiled") in by:
            ratio = by[(size, "compiled")].tokens_per_s / by[(size, "eager")].tokens_per_s
            sub += f"\ncompiled/eager {ratio:.2f}x"
        ax.set_title(sub, fontsize=9)
        ax.margins(y=0.15)
        ax.tick_params(axis="y", labelsize=8)
    axes[0][0].set_ylabel("training tokens/s")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def docs_section(
    command: str,
    info: dict[str, str],
    peak_text: str,
    device: torch.device,
    amp: torch.dtype | None,
    setup: str,
    table: str,
    ratios: str,
    plot_rel: str | None,
) -> str:
    date = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    machine = "; ".join(f"{k}: {v}" for k, v in info.items())
    if device.type == "cpu":
        mfu_text = (
            "on CPU, **MFU is relative to a measured peak** (the best 2048x2048 matmul on the "
            "same threads), not a datasheet number, so it says how close training gets to "
            "this machine's own matmul speed."
        )
    else:
        mfu_text = "on CUDA the peak is the device's dense datasheet number."
    parts = [
        SECTION,
        "",
        "Training tokens/s of the GPT per model size, eager vs `torch.compile` measured side "
        "by side in one run: a step is the trainer's (forward with targets, backward, grad "
        "clip, AdamW, `zero_grad`) on random tokens, warmup and compilation excluded, and "
        "tokens/s is the median of the timed chunks (min-max shows how noisy the machine was). "
        "MFU is `model.flops_per_token(T)` (6N + 12LHQT) x tokens/s over the peak FLOP/s; "
        f"{mfu_text} "
        "`compiled / eager` above 1 means compiling speeds training up; the first compiled "
        "step (compilation with an empty cache) is a one-off cost paid at startup.",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}  ",
        f"Device: {device.type}; AMP: {str(amp).split('.')[-1] if amp else 'none (fp32)'}; "
        f"{setup}  ",
        f"Peak for MFU: {peak_text}  ",
        f"Date: {date}",
        "",
        table,
        "",
    ]
    if ratios:
        parts += [ratios, ""]
    if plot_rel:
        parts += [f"![training tokens/s, eager vs compiled]({plot_rel})", ""]
    return "\n".join(parts)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="GPT training tokens/s and MFU, eager vs torch.compile.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--sizes",
        default=None,
        help=f"comma-separated presets from {', '.join(PRESETS)} "
        "(default: tiny,small on CPU; all on CUDA)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--amp",
        default="auto",
        choices=["auto", "bf16", "fp16", "none"],
        help="autocast dtype; auto = bf16 (fp16 if unsupported) on CUDA, none on CPU",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="batch size for every size (default: per preset and device)",
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 30 CPU, 50 CUDA)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (incl. compilation)")
    p.add_argument(
        "--chunks",
        type=int,
        default=None,
        help="timed steps are split into this many chunks; tokens/s is the median chunk "
        "(default: 10 CPU, 5 CUDA)",
    )
    p.add_argument(
        "--interleave",
        default="auto",
        choices=["auto", "yes", "no"],
        help="keep eager and compiled models of a size alive together and alternate their "
        "timed chunks (auto: yes on CPU, no on CUDA, where it would double the memory)",
    )
    p.add_argument("--compile", default="both", choices=["both", "eager", "compiled"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny only, batch 4, 2 warmup and 4 timed steps",
    )
    p.add_argument(
        "--write-docs",
        action="store_true",
        help=f"write the results into {DOCS.relative_to(ROOT)} and {PLOT.relative_to(ROOT)}",
    )
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        help=f"write the bar chart here (with --write-docs: {PLOT.relative_to(ROOT)})",
    )
    p.add_argument(
        "--warm-cache",
        action="store_true",
        help="let torch.compile reuse its on-disk caches from earlier runs (default: a fresh "
        "temporary cache, so the compile time is that of a first compile)",
    )
    p.add_argument(
        "--allow-gpu-only-on-cpu",
        action="store_true",
        help="let GPU-only presets (medium, seed) run on CPU",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.warm_cache or args.compile == "eager":
        return run(args, argv)
    with tempfile.TemporaryDirectory(prefix="throughput-inductor-") as cache:
        saved = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
        try:
            return run(args, argv)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    from tqdm.auto import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
        amp = amp_dtype(args.amp, device)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.quick:
        sizes = ["tiny"] if args.sizes is None else args.sizes.split(",")
        steps, warmup, chunks = args.steps or 4, min(args.warmup, 2), args.chunks or 2
    else:
        sizes = (
            args.sizes.split(",")
            if args.sizes
            else (list(PRESETS) if device.type == "cuda" else ["tiny", "small"])
        )
        steps = args.steps or (50 if device.type == "cuda" else 30)
        warmup = args.warmup
        chunks = args.chunks or (5 if device.type == "cuda" else 10)
    sizes = [s.strip() for s in sizes if s.strip()]
    for s in sizes:
        if s not in PRESETS:
            print(f"error: unknown size {s!r}; choose from {', '.join(PRESETS)}", file=sys.stderr)
            return 2
        if PRESETS[s].gpu_only and device.type != "cuda" and not args.allow_gpu_only_on_cpu:
            print(
                f"error: size {s!r} is GPU-only; pass --allow-gpu-only-on-cpu to run it on "
                f"{device.type} anyway",
                file=sys.stderr,
            )
            return 2
    if warmup < 1 or steps < 1 or chunks < 1:
        print("error: --warmup, --steps and --chunks must be >= 1", file=sys.stderr)
        return 2
    chunks = min(chunks, steps)
    modes = ["eager", "compiled"] if args.compile == "both" else [args.compile]
    interleave = (
        args.interleave == "yes" or (args.interleave == "auto" and device.type != "cuda")
    ) and len(modes) > 1

    info = machine_info(device)
    compute_dtype = amp or torch.float32
    if device.type == "cuda":
        peak, peak_text = cuda_peak(device, compute_dtype)
        if peak is not None:
            peak_text += f" = {peak / 1e12:.0f} TFLOP/s"
    else:
        peak = measure_matmul_peak(device, compute_dtype)
        peak_text = (
            f"measured {str(compute_dtype).split('.')[-1]} 2048x2048 matmul, "
            f"best of 10 = {peak / 1e9:.1f} GFLOP/s"
        )
    print(f"machine: {'; '.join(f'{k}: {v}' for k, v in info.items())}", file=sys.stderr)
    print(f"peak for MFU: {peak_text}", file=sys.stderr)
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if (
        device.type == "cpu"
        and hasattr(os, "getloadavg")
        and os.getloadavg()[0] > 0.5 * (ncpu or 1)
    ):
        print(
            f"warning: load average {os.getloadavg()[0]:.2f} on {ncpu} cores; other work on this "
            "machine will slow the measurement",
            file=sys.stderr,
        )

    results: list[Result] = []
    with tqdm(
        total=len(sizes) * len(modes) * (warmup + steps),
        unit="step",
        file=sys.stderr,
        dynamic_ncols=True,
    ) as bar:
        for s in sizes:
            pr = PRESETS[s]
            batch = args.batch_size or (
                4 if args.quick else (pr.batch_cuda if device.type == "cuda" else pr.batch_cpu)
            )
            results += measure_size(
                s, modes, ModelConfig.from_flat(**pr.model), batch, device, amp,
                warmup, steps, chunks, interleave, peak, bar,
            )  # fmt: skip
            free_memory(device)

    if hasattr(os, "getloadavg"):
        info["load avg at end"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    table = results_table(results, device)
    ratios = ratio_table(results)
    amp_name = str(amp).split(".")[-1] if amp else "none (fp32)"
    setup = (
        f"{steps} timed steps in {chunks} chunks after {warmup} warmup, "
        f"{'interleaved' if interleave else 'sequential'}"
    )
    if "compiled" in modes:
        setup += ", warm compile cache" if args.warm_cache else ", fresh compile cache"
    print()
    print(f"Training throughput on {info.get('gpu', info['cpu'])}, amp {amp_name}, {setup}")
    print()
    print(table)
    if ratios:
        print()
        print(ratios)
    print()
    if device.type == "cpu":
        print(
            f"NOTE: CPU MFU is relative to a measured matmul peak ({peak_text}), "
            "not a datasheet number."
        )
    else:
        print(f"MFU peak: {peak_text}")

    plot_path = args.plot or (PLOT if args.write_docs else None)
    if plot_path is not None:
        title = (
            "GPT training tokens/s, eager vs torch.compile\n"
            f"{device.type}: {info.get('gpu', info['cpu'])}, amp {amp_name}"
        )
        plot(results, plot_path, title)
        print(f"wrote {plot_path}")
    if args.write_docs:
        command = "python " + shlex.join(
            [
                str(Path(sys.argv[0]).resolve().relative_to(ROOT))
                if Path(sys.argv[0]).resolve().is_relative_to(ROOT)
                else sys.argv[0]
            ]
            + (sys.argv[1:] if argv is None else list(argv))
        )
        plot_rel = None
        if plot_path is not None:
            p = Path(plot_path).resolve()
            plot_rel = os.path.relpath(p, DOCS.parent)
        from _docs import write_section

        write_section(
            DOCS, "throughput",
            docs_section(command, info, peak_text, device, amp, setup, table, ratios, plot_rel),
            title="# Benchmarks\n\nResults of the scripts in `benchmarks/`, each with the command that produced it.",
        )
        print(f"wrote {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
