"""Fast-weight memory kernels: chunked vs recurrent vs the seed's materialising form.

Times forward + backward of each form of ``neuroplastic.ops.fast_weight`` side by side
in one run, over sequence lengths T, and measures the peak memory of each:

* ``hebbian recurrent``: the step-by-step reference (Python loop over T);
* ``hebbian chunked``: the chunk-parallel form (chunk 64);
* ``materialized``: the seed AGIFORMER's style, which materialises a (B, T, H, dk, dv)
  tensor of all states;
* ``delta recurrent`` / ``delta chunked``: the gated delta rule, step by step and in
  the WY/UT chunk form.

Inputs: float32, unit-norm keys, the seed's decay range ``lambda = 0.99 + 0.01 u``
(u uniform; the materialising form overflows for faster decay), beta uniform in
(0, 1). Loss = sum(o * w) + sum(final_state * w') with fixed random weights, so every
output and the state get a gradient. Time is the best of ``--repeats`` rounds, the forms
interleaved within each round so that load from elsewhere on a shared machine hits all
alike (the median is printed too). On CPU the default is one torch thread: on a shared
machine, two OpenMP threads stall at every parallel region whenever another process
holds a core (we saw the same step take 25 ms or 1,400 ms), and one thread gives the
per-core ratio, which is conservative for the chunked form (its large matmuls are what
extra threads would speed up).

Peak memory (CPU): each (form, T) runs once in a fresh subprocess, after a small warm-up
of the same form; the peak resident set size (Linux ``VmHWM``, reset through
``/proc/self/clear_refs`` after the warm-up) minus the resident size just before the
run, with ``MALLOC_MMAP_THRESHOLD_`` fixed so that freed buffers leave the RSS. It includes autograd's saved tensors and allocator slack, and is a real process
measurement, not a tensor count. The analytic size of the largest single tensor of each
form is reported next to it. On CUDA it is ``torch.cuda.max_memory_allocated`` instead.

    python benchmarks/fast_weight.py                 # T = 256..4096, B=1, H=4, d=32, CPU
    python benchmarks/fast_weight.py --quick         # smoke run
    python benchmarks/fast_weight.py --write-docs    # also update docs/BENCHMARKS.md and
                                                     # docs/fast_weight.png
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from neuroplastic.ops.fast_weight import (
    _BLOCK_ELEMENTS,
    delta_rule_chunked,
    delta_rule_recurrent,
    fast_weight_chunked,
    fast_weight_recurrent,
    feature_map,
    materialized_fast_weight,
)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "BENCHMARKS.md"
PLOT = ROOT / "docs" / "fast_weight.png"
KEY = "fast-weight"

FORMS = ("hebbian recurrent", "hebbian chunked", "materialized", "delta recurrent", "delta chunked")
RECURRENT = ("hebbian recurrent", "delta recurrent")


def make_inputs(B, H, T, d, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, d, generator=gen)
    k = feature_map(torch.randn(B, H, T, d, generator=gen), "identity_l2")
    v = torch.randn(B, H, T, d, generator=gen)
    g = torch.log(0.99 + 0.01 * torch.rand(B, H, T, generator=gen))
    beta = torch.rand(B, H, T, generator=gen)
    wo = torch.randn(B, H, T, d, generator=gen)
    ws = torch.randn(B, H, d, d, generator=gen)
    leaves = [t.to(device).requires_grad_() for t in (q, k, v, g, beta)]
    return leaves, wo.to(device), ws.to(device)


def step(form, leaves, wo, ws, chunk):
    """One forward + backward of ``form``; gradients are cleared first."""
    for t in leaves:
        t.grad = None
    q, k, v, g, beta = leaves
    if form == "hebbian recurrent":
        o, s = fast_weight_recurrent(q, k, v, g)
    elif form == "hebbian chunked":
        o, s = fast_weight_chunked(q, k, v, g, chunk_size=chunk)
    elif form == "materialized":
        o, s = materialized_fast_weight(q, k, v, g)
    elif form == "delta recurrent":
        o, s = delta_rule_recurrent(q, k, v, beta, g)
    elif form == "delta chunked":
        o, s = delta_rule_chunked(q, k, v, beta, g, chunk_size=chunk)
    else:
        raise ValueError(form)
    ((o * wo).sum() + (s * ws).sum()).backward()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def largest_tensor_bytes(form, B, H, T, d, chunk) -> int:
    """Analytic size (float32) of the largest single tensor a form creates."""
    C = min(chunk, T)
    N = -(-T // C)
    if form == "materialized":
        n = B * T * H * d * d  # all states
    elif form == "hebbian chunked":  # (C, C) work in blocks of chunks; chunk states; (T, d)
        per_block = max(1, _BLOCK_ELEMENTS // (B * H * C * C))
        n = max(B * H * min(N, per_block) * C * C, B * H * N * d * d, B * H * N * C * d)
    elif form == "delta chunked":
        n = max(B * H * N * C * C, B * H * N * d * d, B * H * N * C * 2 * d)
    else:
        n = max(B * H * T * d, B * H * d * d)  # one state per step; T of them are saved
    return 4 * n


# --------------------------------------------------------------------------- memory (subprocess)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def child_memory(form, B, H, T, d, chunk, device_name) -> dict:
    device = torch.device(device_name)
    leaves, wo, ws = make_inputs(B, H, min(T, 64), d, device)
    step(form, leaves, wo, ws, chunk)  # warm-up: load kernels, thread pools
    leaves, wo, ws = make_inputs(B, H, T, d, device)
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step(form, leaves, wo, ws, chunk)
        sync(device)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device) - base, "how": "cuda"}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_kb("VmRSS")
    step(form, leaves, wo, ws, chunk)
    return {"peak_bytes": (_status_kb("VmHWM") - base) * 1024, "how": "rss"}


def measure_memory(form, B, H, T, d, chunk, device, threads) -> int | None:
    cmd = [
        sys.executable, __file__, "--_child-memory",
        json.dumps(dict(form=form, B=B, H=H, T=T, d=d, chunk=chunk, device_name=str(device))),
        "--threads", str(threads),
    ]  # fmt: skip
    # a fixed mmap threshold: glibc then maps every large buffer on its own and unmaps it
    # on free (no dynamic threshold, no heap reuse), so the RSS follows the live tensors
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if proc.returncode != 0:
        print(
            f"memory measurement of {form} at T={T} failed:\n{proc.stderr[-2000:]}", file=sys.stderr
        )
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]


# --------------------------------------------------------------------------- report


def machine_info(device, threads) -> dict[str, str]:
    from _machine import cpu_cores, cpu_model

    info = {
        "cpu": f"{cpu_model()} ({cpu_cores()} cores, {threads} torch thread{'s' if threads > 1 else ''})",
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        info["load avg at start"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return info


def fmt_ms(x):
    return (
        "-" if x is None else (f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}")
    )


def fmt_mb(x):
    if x is None:
        return "-"
    x = x / 2**20
    return f"{x:,.1f}" if x >= 10 else f"{x:.2f}"


def fmt_ratio(a, b, est=False):
    if a is None or b is None or b <= 0:
        return "-"
    return f"{a / b:,.1f}x" + (" (extrap.)" if est else "")


def build_tables(lengths, times, mem, largest, extrap):
    def t(form, T):
        return times.get((form, T), {}).get("best")

    def rec(form, T):
        if t(form, T) is not None:
            return t(form, T), False
        return extrap.get((form, T)), True

    head = (
        "| T | hebbian recurrent ms | hebbian chunked ms | materialized ms | "
        "chunked vs recurrent | chunked vs materialized | delta recurrent ms | "
        "delta chunked ms | delta chunked vs recurrent |\n|---|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for T in lengths:
        hr, hr_est = rec("hebbian recurrent", T)
        dr, dr_est = rec("delta recurrent", T)
        rows.append(
            f"| {T} | {fmt_ms(hr)}{' (extrap.)' if hr_est and hr else ''} | "
            f"{fmt_ms(t('hebbian chunked', T))} | {fmt_ms(t('materialized', T))} | "
            f"**{fmt_ratio(hr, t('hebbian chunked', T), hr_est)}** | "
            f"**{fmt_ratio(t('materialized', T), t('hebbian chunked', T))}** | "
            f"{fmt_ms(dr)}{' (extrap.)' if dr_est and dr else ''} | {fmt_ms(t('delta chunked', T))} | "
            f"**{fmt_ratio(dr, t('delta chunked', T), dr_est)}** |"
        )
    time_table = "\n".join(rows)

    head = (
        "| T | "
        + " | ".join(f"{f} MiB" for f in FORMS)
        + " | materialized / chunked | largest tensor: materialized / chunked |\n|"
        + "---|" * (len(FORMS) + 3)
    )
    rows = [head]
    for T in lengths:
        cells = [fmt_mb(mem.get((f, T))) for f in FORMS]
        m, c = mem.get(("materialized", T)), mem.get(("hebbian chunked", T))
        lm, lc = largest[("materialized", T)], largest[("hebbian chunked", T)]
        rows.append(
            f"| {T} | " + " | ".join(cells) + f" | **{fmt_ratio(m, c)}** | "
            f"{fmt_mb(lm)} / {fmt_mb(lc)} MiB ({lm / lc:,.0f}x) |"
        )
    return time_table, "\n".join(rows)


def plot(lengths, times, mem, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {
        "hebbian recurrent": ("tab:blue", "--"),
        "hebbian chunked": ("tab:blue", "-"),
        "materialized": ("tab:red", "-"),
        "delta recurrent": ("tab:green", "--"),
        "delta chunked": ("tab:green", "-"),
    }
    for form, (color, ls) in styles.items():
        xs = [T for T in lengths if (form, T) in times]
        if xs:
            ax1.plot(
                xs, [times[(form, T)]["best"] for T in xs], ls, color=color, marker="o", label=form
            )
        xs = [T for T in lengths if mem.get((form, T))]
        if xs:
            ax2.plot(
                xs, [mem[(form, T)] / 2**20 for T in xs], ls, color=color, marker="o", label=form
            )
    for ax, ylabel in ((ax1, "forward + backward, ms (best of rounds)"), (ax2, "peak memory, MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    ax1.set_title("time")
    ax2.set_title("peak memory (RSS delta)" if mem else "peak memory")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


# our torch forms first (seconds), then fla's: its first call per rule autotunes (slow)
VS_FLA_FORMS = (
    "hebbian torch fp32", "hebbian torch bf16", "delta torch fp32", "delta torch bf16",
    "hebbian fla-path bf16", "hebbian fla direct bf16", "delta fla-path bf16", "delta fla direct bf16",
)


def vs_fla(shape: str, device: torch.device, repeats: int) -> int:
    """Ours vs flash-linear-attention, forward + backward at one shape (default B4 H8 T4096
    d64): our torch forms in float32 and bf16 (``backend="torch"``), our dispatch to fla
    (``backend="fla"``: the layout transposes included) and fla called directly on
    ``(B, T, H, d)`` tensors. fla's Triton autotune runs once per form, untimed; each row is
    printed as soon as it is timed (median and best of ``repeats``)."""
    from neuroplastic.ops import fla_backend
    from neuroplastic.ops.fast_weight import fast_weight

    B, H, T, d = (int(x) for x in shape.split(","))
    have_fla = device.type == "cuda" and fla_backend.fla_available()
    print(f"vs fla: B={B} H={H} T={T} d={d}, forward + backward, device "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"fla {'available' if have_fla else 'NOT available: fla rows skipped'}, TF32 matmul "
          f"{torch.backends.cuda.matmul.allow_tf32}", flush=True)
    (q, k, v, g, beta), wo, ws = make_inputs(B, H, T, d, device)
    base = [t.detach() for t in (q, k, v, g, beta)]

    def leaves_for(dtype, fla_layout):
        out = []
        for i, t in enumerate(base):
            t = t.to(dtype) if i in (0, 1, 2) or (i == 4 and dtype != torch.float32) else t
            if fla_layout:
                t = t.transpose(1, 2).contiguous()
            out.append(t.clone().requires_grad_())
        return out

    def runner(form):
        rule = form.split()[0]
        dtype = torch.float32 if form.endswith("fp32") else torch.bfloat16
        direct = "direct" in form
        lv = leaves_for(dtype, direct)
        wo_ = (wo.transpose(1, 2).contiguous() if direct else wo).to(dtype)

        def run():
            for t in lv:
                t.grad = None
            q_, k_, v_, g_, b_ = lv
            if direct:
                if rule == "hebbian":
                    from fla.ops.simple_gla import chunk_simple_gla

                    o, s = chunk_simple_gla(q_, k_, v_, g=g_, scale=1.0, output_final_state=True)
                else:
                    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

                    o, s = chunk_gated_delta_rule(q_, k_, v_, g_, b_, scale=1.0,
                                                  output_final_state=True)
            else:
                backend = "fla" if "fla" in form else "torch"
                o, s = fast_weight(q_, k_, v_, g_, rule=rule, beta=b_, backend=backend)
            ((o.float() * wo_.float()).sum() + (s.float() * ws).sum()).backward()

        return run

    for form in VS_FLA_FORMS:
        if "fla" in form and not have_fla:
            print(f"{form:26s} skipped (fla not usable here)", flush=True)
            continue
        run = runner(form)
        sync(device)
        t0 = time.perf_counter()
        run()  # warm-up (fla: Triton autotune and compile)
        sync(device)
        warm = time.perf_counter() - t0
        samples = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            run()
            sync(device)
            samples.append(1e3 * (time.perf_counter() - t0))
        print(f"{form:26s} median {statistics.median(samples):9.2f} ms  best {min(samples):9.2f} ms"
              f"  (warm-up {warm:.1f} s)", flush=True)
        del run
        gc.collect()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vs-fla", action="store_true",
                    help="ours vs flash-linear-attention at --fla-shape (fla rows need CUDA)")
    ap.add_argument("--fla-shape", default="4,8,4096,64", help="B,H,T,d for --vs-fla")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=32, help="head dim (dk = dv)")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (best is reported)")
    ap.add_argument(
        "--max-recurrent-T", type=int, default=4096,
        help="time the recurrent forms only up to this T; longer ones are extrapolated linearly",
    )  # fmt: skip
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument(
        "--threads", type=int, default=None,
        help="torch threads (default: 1 on CPU, see the module docstring; torch's own on CUDA)",
    )  # fmt: skip
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="smoke run: T = 128, 256, 2 rounds")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--_child-memory", dest="child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if args.threads is None and device.type == "cpu" and not args.child:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.child:
        print(json.dumps(child_memory(**json.loads(args.child))))
        return 0
    if args.vs_fla:
        return vs_fla(args.fla_shape, device, args.repeats)

    if args.quick:
        args.lengths, args.repeats = [128, 256], 2
    lengths = sorted(args.lengths)
    B, H, d, C = args.batch, args.heads, args.dim, args.chunk
    info = machine_info(device, threads)
    cmd = "python benchmarks/fast_weight.py" + "".join(
        " " + shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    print(f"{cmd}\n{info}", file=sys.stderr)

    # ---- time: interleaved rounds, best of
    times: dict[tuple[str, int], dict] = {}
    for T in lengths:
        forms = [f for f in FORMS if f not in RECURRENT or T <= args.max_recurrent_T]
        leaves, wo, ws = make_inputs(B, H, T, d, device)
        for f in forms:  # warm-up
            step(f, leaves, wo, ws, C)
        samples: dict[str, list[float]] = {f: [] for f in forms}
        for _ in range(args.repeats):
            for f in forms:
                sync(device)
                t0 = time.perf_counter()
                step(f, leaves, wo, ws, C)
                sync(device)
                samples[f].append(1e3 * (time.perf_counter() - t0))
        for f in forms:
            times[(f, T)] = {"best": min(samples[f]), "median": statistics.median(samples[f])}
            print(
                f"T={T:5d} {f:18s} best {times[(f, T)]['best']:9.2f} ms  "
                f"median {times[(f, T)]['median']:9.2f} ms",
                file=sys.stderr,
            )
        del leaves, wo, ws
        gc.collect()

    # recurrent beyond --max-recurrent-T: linear in T from the longest timed length
    extrap: dict[tuple[str, int], float] = {}
    for f in RECURRENT:
        timed = [T for T in lengths if (f, T) in times]
        for T in lengths:
            if (f, T) not in times and timed:
                extrap[(f, T)] = times[(f, timed[-1])]["best"] * T / timed[-1]

    # ---- memory
    mem: dict[tuple[str, int], int | None] = {}
    if not args.no_memory:
        for T in lengths:
            for f in FORMS:
                mem[(f, T)] = measure_memory(f, B, H, T, d, C, device, threads)
                print(f"T={T:5d} {f:18s} peak {fmt_mb(mem[(f, T)])} MiB", file=sys.stderr)
    largest = {(f, T): largest_tensor_bytes(f, B, H, T, d, C) for f in FORMS for T in lengths}

    if hasattr(os, "getloadavg"):
        info["load avg at end"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    time_table, mem_table = build_tables(lengths, times, mem, largest, extrap)
    setup = (
        f"B={B}, H={H}, dk=dv={d}, chunk {C}, float32, device {device}, {threads} torch "
        f"thread{'s' if threads > 1 else ''}; forward + backward; best of {args.repeats} "
        "interleaved rounds after one warm-up"
    )
    print(f"\n{setup}\n\n{time_table}\n\n{mem_table}")

    # ---- verdicts
    T0 = 1024 if 1024 in lengths else lengths[len(lengths) // 2]
    Tmax = lengths[-1]

    def ratio(a, b):
        return None if a is None or b is None else a / b

    def best(form, T):
        return times.get((form, T), {}).get("best") or extrap.get((form, T))

    def verdict(num, den, target, at, get=best):
        r = {T: ratio(get(num, T), get(den, T)) for T in lengths}
        r = {T: x for T, x in r.items() if x is not None}
        if at not in r:
            return "not measured"
        head = f"{r[at]:,.1f}x at T = {at}: **{'met' if r[at] >= target else 'NOT met'}**"
        met = [T for T, x in r.items() if x >= target]
        missed = [T for T, x in r.items() if x < target]
        where = f"met at T = {', '.join(map(str, met)) or 'none'}"
        if missed:
            where += f"; not at T = {', '.join(map(str, missed))}"
        return f"{head} ({where})"

    def peak(form, T):
        return mem.get((form, T))

    verdicts = (
        "- chunked >= 10x recurrent (forward + backward; issue: at T = 1024 on CPU): "
        f"{verdict('hebbian recurrent', 'hebbian chunked', 10, T0)}\n"
        "- chunked >= 20x faster than the materialising form: "
        f"{verdict('materialized', 'hebbian chunked', 20, Tmax)}\n"
        "- chunked >= 10x less peak memory than the materialising form (measured): "
        f"{verdict('materialized', 'hebbian chunked', 10, Tmax, peak)}\n"
        "- delta rule: chunked >= 5x faster than recurrent: "
        f"{verdict('delta recurrent', 'delta chunked', 5, T0)}"
    )
    print("\n" + verdicts)

    if args.write_docs:
        date = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        machine = "; ".join(f"{k}: {v}" for k, v in info.items())
        plot(
            lengths,
            times,
            mem,
            PLOT,
            f"fast-weight memory, {setup}\n{info['cpu']}, torch {torch.__version__}",
        )
        threads_note = ""
        if device.type == "cpu" and threads == 1:
            threads_note = (
                " One torch thread: with two, every parallel region stalls whenever another "
                "process holds a core (the same step took 25 ms or 1,400 ms on this shared "
                "machine); one thread gives per-core ratios, conservative for the chunked "
                "forms, whose large matmuls are what more threads would speed up."
            )
        skipped = " Every length was measured for every form; nothing is extrapolated."
        if extrap:
            skipped = (
                f" Recurrent forms were timed up to T = {args.max_recurrent_T}; the longer "
                "lengths marked *extrap.* are linear extrapolations, not measurements."
            )
        mem_how = (
            "Peak memory: each form and length runs once in a fresh subprocess after a "
            "small warm-up; **peak resident set size (VmHWM, reset after the warm-up) "
            "minus the resident size just before the forward**, with glibc's "
            "`MALLOC_MMAP_THRESHOLD_=65536` so that every large buffer is unmapped when "
            "freed and the RSS follows the live tensors. It counts everything the step "
            "allocates: autograd's saved tensors, the gradients of q, k, v, the loss "
            "temporaries (the same for every form). The last column is the analytic size "
            "of the largest single float32 tensor of each form."
            if device.type == "cpu"
            else "Peak memory: torch.cuda.max_memory_allocated minus the allocation before the step."
        )
        body = (
            "## Fast-weight memory kernels (benchmarks/fast_weight.py)\n\n"
            "Forward + backward of the memory op `neuroplastic.ops.fast_weight` in its forms, "
            "measured side by side in one run: the step-by-step **recurrent** reference, the "
            "**chunked** chunk-parallel form, the seed AGIFORMER's **materialized** form "
            "(all states as one (B, T, H, dk, dv) tensor), and the gated **delta** rule "
            "(recurrent and WY/UT chunked). Inputs: unit-norm keys, seed-range decay "
            "lambda = 0.99 + 0.01 u (the materialising form overflows for faster decay). "
            "Times are the best of the interleaved rounds (a shared machine: the best is the "
            f"least disturbed).{threads_note}{skipped}\n\n"
            f"Command: `{cmd}`  \n"
            f"Machine: {machine}  \n"
            f"Setup: {setup}  \n"
            f"Date: {date}\n\n"
            f"{time_table}\n\n{mem_how}\n\n{mem_table}\n\n"
            f"Targets (issue 5):\n\n{verdicts}\n\n"
            "![fast-weight time and memory vs T](fast_weight.png)\n"
        )
        from _docs import write_section

        write_section(DOCS, KEY, body)
        print(f"wrote {DOCS.relative_to(ROOT)} and {PLOT.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
