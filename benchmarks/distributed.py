"""Data-parallel scaling: training tokens/s of the real trainer with 1..N torchrun processes.

Each configuration runs ``torchrun --standalone --nproc_per_node N`` on this script in
worker mode: the :class:`~neuroplastic.training.trainer.Trainer` trains a GPT on the
embedded synthetic data with ``train.batch_size`` rows *per process* (weak scaling: the
global batch grows with N), DDP on gloo (CPU) or nccl (CUDA), with and without
plasticity rules (Traces + EWC + Hebbian, whose Hebbian statistics and reward are
all-reduced every step by ``PlasticityEngine.sync``; no reward is computed: sampling a
reward costs every rank the same and would hide the data-parallel overhead). After ``--warmup`` untimed steps,
``--steps`` steps are timed; tokens/s counts all processes' tokens. Scaling efficiency is
``tokens/s(N) / (N * tokens/s(1))`` of the same rule set; MFU is the trainer's (model
FLOPs per token x tokens/s over N x the device peak: measured matmul peak on CPU,
datasheet on known GPUs; a CPU peak is measured once by the driver and given to every
run, so that MFU compares across configurations).

    python benchmarks/distributed.py                         # CPU: 1 and 2 processes
    python benchmarks/distributed.py --quick                 # smoke run
    python benchmarks/distributed.py --device cuda --procs 1,2,4,8 --write-docs

On CPU every process gets ``--threads`` torch threads (default 1), so N processes use N
cores: run it with no more processes than free cores, or the numbers measure contention.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
DOCS_PNG = ROOT / "docs" / "distributed.png"
RULES = (
    "[{type: traces, params: '*.c_*.weight', plasticity_lr: 0.001},"
    " {type: ewc, params: '*.weight', lam: 1.0},"
    " {type: hebbian, params: '*.mlp.c_fc', lr: 0.0001}]"
)
PRESETS = {
    # the `tiny` recipe's model
    "tiny": {"model.n_layer": 4, "model.n_embd": 128, "model.n_head": 4, "model.block_size": 128},
    "small": {"model.n_layer": 6, "model.n_embd": 384, "model.n_head": 6, "model.block_size": 256},
}


# ---------------------------------------------------------------------------- worker


def worker(spec: dict) -> int:
    import torch

    torch.set_num_threads(spec["threads"])
    from neuroplastic.config import load_config
    from neuroplastic.training.trainer import Trainer

    over = {
        **PRESETS[spec["size"]],
        "train.batch_size": spec["batch"], "train.device": spec["device"],
        "train.max_steps": 10_000, "train.warmup_steps": 10, "train.eval_interval": 0,
        "train.ckpt_interval": 0, "train.log_interval": 10_000, "train.progress": False,
        "train.tensorboard": False, "train.keep_best": False, "train.out_dir": spec["out"],
        "data.max_chars": 200_000,
        "plasticity.rules": RULES if spec["rules"] else "[]",
        "train.peak_tflops": spec["peak_tflops"],
    }
    t = Trainer(load_config("tiny", [f"{k}={v}" for k, v in over.items()])).setup()
    t.train(stop_at=spec["warmup"])
    _sync(t.device)
    t0 = time.perf_counter()
    tokens0 = t.tokens_seen
    t.train(stop_at=spec["warmup"] + spec["steps"])
    _sync(t.device)
    dt = time.perf_counter() - t0
    if t.dist.is_main:
        tps = (t.tokens_seen - tokens0) / dt
        result = {
            "tokens_per_s": tps, "ms_per_step": 1e3 * dt / spec["steps"], "mfu": t.report.mfu(tps),
            "peak": t.report.mfu.peak.source, "params": sum(p.numel() for p in t.model.parameters()),
            "backend": t.dist.backend or "-", "device": str(t.device),
        }
        if t.device.type == "cuda":
            import torch

            result["gpu"] = torch.cuda.get_device_name(t.device)
        Path(spec["result"]).write_text(json.dumps(result), encoding="utf-8")
    return 0


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- driver


def run_config(args, procs: int, rules: bool, tmp: Path) -> dict:
    name = f"n{procs}-{'rules' if rules else 'plain'}"
    spec = {
        "peak_tflops": args.peak_tflops,
        "size": args.size, "batch": args.batch, "device": args.device, "threads": args.threads,
        "warmup": args.warmup, "steps": args.steps, "rules": rules,
        "out": str(tmp / name), "result": str(tmp / f"{name}.json"),
    }
    spec_path = tmp / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(procs), __file__, "--_worker", str(spec_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(Path(spec["result"]).read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", default="1,2", help="comma-separated process counts")
    ap.add_argument("--size", default="tiny", choices=list(PRESETS))
    ap.add_argument("--batch", type=int, default=8, help="rows per process")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (one GPU per process)")
    ap.add_argument("--rules", default="both", choices=["both", "plain", "rules"])
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 timed steps, batch 4")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--_worker", dest="worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(json.loads(Path(args.worker).read_text(encoding="utf-8")))
    if args.quick:
        args.steps, args.warmup, args.batch = 4, 1, 4
    try:
        procs = [int(p) for p in args.procs.split(",") if p]
    except ValueError:
        ap.error(f"--procs must be comma-separated integers, got {args.procs!r}")
    if not procs or min(procs) < 1:
        ap.error("--procs needs at least one positive process count")
    rule_sets = {"both": [False, True], "plain": [False], "rules": [True]}[args.rules]
    import torch

    if args.device == "cpu":  # one measured peak for every run (the trainer's measurement)
        from neuroplastic.training.mfu import device_peak

        torch.set_num_threads(args.threads)
        args.peak_tflops = device_peak(torch.device("cpu")).flops / 1e12
    else:
        args.peak_tflops = 0.0  # datasheet (or measured) in each worker
    from tqdm.auto import tqdm

    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    results: dict[tuple[int, bool], dict] = {}
    with tempfile.TemporaryDirectory(prefix="dist-bench-") as tmp:
        jobs = [(n, r) for r in rule_sets for n in procs]
        for n, r in tqdm(jobs, desc="configurations"):
            results[(n, r)] = run_config(args, n, r, Path(tmp))
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None

    first = next(iter(results.values()))
    backend = next((res["backend"] for (n, _), res in results.items() if n > 1), "-")
    lines = [
        "| rules | processes | global batch | tokens/s | ms/step | scaling efficiency | MFU |",
        "|---|---|---|---|---|---|---|",
    ]
    for (n, r), res in results.items():
        base = results.get((1, r))
        eff = f"{res['tokens_per_s'] / (n * base['tokens_per_s']):.0%}" if base else "-"
        lines.append(
            f"| {'Traces+EWC+Hebbian' if r else 'none'} | {n} | {n * args.batch} x "
            f"{PRESETS[args.size]['model.block_size']} | {res['tokens_per_s']:,.0f} | "
            f"{res['ms_per_step']:.1f} | {eff} | {res['mfu']:.2%} |"
        )
    table = "\n".join(lines)

    machine = first.get("gpu") or f"{platform.machine()} CPU, {os.cpu_count()} cores"
    load = ""
    if load_start and load_end:
        load = (f"; load avg at start {', '.join(f'{x:.2f}' for x in load_start)}, at end "
                f"{', '.join(f'{x:.2f}' for x in load_end)}")
    header = (
        f"GPT `{args.size}` ({first['params'] / 1e6:.2f}M parameters), {args.batch} rows x "
        f"{PRESETS[args.size]['model.block_size']} tokens per process, DDP on {backend}, "
        f"{args.warmup} warmup + {args.steps} timed steps; device {first['device']} ({machine}), "
        f"{args.threads} torch thread(s) per process; torch {torch.__version__}; MFU peak: "
        + (f"{args.peak_tflops * 1e3:.1f} GFLOP/s (measured float32 1024x1024 matmul)"
           if args.device == "cpu" else first["peak"])
        + f"; {_dt.date.today()}{load}."
    )
    cmd = "python benchmarks/distributed.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    print(header)
    print(table)
    png = _plot(results, args, DOCS_PNG if args.write_docs else None)
    if args.write_docs:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _docs import write_section

        write_section(
            ROOT / "docs" / "BENCHMARKS.md",
            "distributed",
            "## Data-parallel scaling (benchmarks/distributed.py)\n\n"
            f"Command: `{cmd.strip()}`\n\n{header}\n\n{table}\n\n"
            "Weak scaling: each process keeps its batch, so the ideal is N x the tokens/s of one "
            "process (100% efficiency). On CPU the processes share one machine's memory "
            "bandwidth and the gloo all-reduce goes through shared memory/TCP, so this measures "
            "the overhead of the data-parallel machinery rather than multi-GPU scaling.\n\n"
            + (f"![tokens/s by processes]({png.name})\n" if png else "")
        )
    return 0


def _plot(results: dict, args, path: Path | None) -> Path | None:
    if path is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for rules in sorted({r for _, r in results}):
        ns = sorted(n for n, r in results if r == rules)
        ax.plot(ns, [results[(n, rules)]["tokens_per_s"] for n in ns], marker="o",
                label="Traces+EWC+Hebbian" if rules else "no rules")
        base = results.get((1, rules))
        if base:
            ax.plot(ns, [n * base["tokens_per_s"] for n in ns], ls=":", color="grey")
    ax.set_xlabel("processes")
    ax.set_ylabel("training tokens/s (all processes)")
    ax.set_title(f"DDP weak scaling, GPT {args.size} (dotted: ideal)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
