"""Run every benchmark in benchmarks/ and record the results in docs/BENCHMARKS.md.

Each ``benchmarks/*.py`` script (except this one) runs as its own process, one after the
other, with ``--write-docs`` so that it writes its own section (table, machine, torch
version, the exact command) and its PNG into docs/. This script then writes a
``run-all`` section: the machine, torch version, and for every benchmark the exact
command, its wall time and whether it succeeded. Scripts are found by listing the
directory, so a new benchmark is run without being registered here; ``QUICK_ARGS``
below only knows how to make the known ones short.

    python benchmarks/run_all.py                    # everything, writes docs/ (an hour on a laptop CPU)
    python benchmarks/run_all.py --quick            # smoke run of everything; docs/ untouched
    python benchmarks/run_all.py --only throughput --only distributed
    python benchmarks/run_all.py --list

``--quick`` runs each benchmark at smoke size and does not touch docs/ (smoke numbers
are not results) unless ``--write-docs`` is given. Exit status: 0 when every benchmark
succeeded, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
DOCS = ROOT / "docs" / "BENCHMARKS.md"

# how to make a known benchmark short (--quick); an unknown one gets --quick if it has one
QUICK_ARGS: dict[str, list[str]] = {
    "throughput": ["--quick"],
    "fast_weight": ["--quick"],
    "plasticity_overhead": [
        "--layers", "2", "--dim", "128", "--heads", "2", "--rounds", "1", "--steps", "2",
        "--warmup", "1",
    ],
    "agiformer_vs_gpt": ["--seconds", "10", "--slice", "5", "--batch", "4", "--block", "64"],
    "distributed": ["--quick"],
    "hf_output_layer": ["--model", "tiny", "--steps", "2"],
    "needle_probe": ["--steps", "4", "--eval-every", "2", "--eval-lengths", "128", "--block", "256",
                     "--batch", "2"],
}

# what to run on a GPU machine (recorded as commands only: no GPU numbers are made up here)
GPU_COMMANDS = [
    "python benchmarks/run_all.py",
    "python benchmarks/throughput.py --sizes small,seed --write-docs",
    "python benchmarks/distributed.py --device cuda --procs 1,2,4,8 --size small --batch 16 --write-docs",
]


@dataclass
class Outcome:
    name: str
    command: str
    returncode: int
    seconds: float
    tail: str


def discover(bench_dir: Path = BENCH_DIR) -> dict[str, Path]:
    """Benchmark scripts by name: every ``*.py`` in ``bench_dir`` but this one and ``_private`` ones."""
    return {
        p.stem: p for p in sorted(bench_dir.glob("*.py"))
        if p.name != Path(__file__).name and not p.name.startswith("_")
    }


def _supports(script: Path, flag: str) -> bool:
    return f'"{flag}"' in script.read_text(encoding="utf-8")


def command_for(name: str, script: Path, quick: bool, write_docs: bool) -> list[str]:
    args: list[str] = []
    if quick:
        args += QUICK_ARGS.get(name, ["--quick"] if _supports(script, "--quick") else [])
    if write_docs and _supports(script, "--write-docs"):
        args.append("--write-docs")
    return [sys.executable, str(script), *args]


def display(cmd: list[str]) -> str:
    """The command as a person would type it from the repository root."""
    script = Path(cmd[1])
    try:
        script_txt = str(script.relative_to(ROOT))
    except ValueError:
        script_txt = str(script)
    return shlex.join(["python", script_txt, *cmd[2:]])


def run_one(name: str, cmd: list[str], log_dir: Path | None) -> Outcome:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    seconds = time.perf_counter() - t0
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        (log_dir / f"{name}.log").write_text(
            f"$ {display(cmd)}\n\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}", encoding="utf-8"
        )
    tail = proc.stdout if proc.returncode == 0 else proc.stderr
    return Outcome(name, display(cmd), proc.returncode, seconds, tail[-3000:])


def machine_line() -> str:
    import torch
    from _machine import cpu_cores, cpu_model

    gpu = "none"
    if torch.cuda.is_available():
        gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return (f"cpu: {cpu_model()} ({cpu_cores()} cores); gpu: {gpu}; torch {torch.__version__}; "
            f"python {platform.python_version()}; {platform.system()} {platform.release()}")


def section(outcomes: list[Outcome], argv: list[str], quick: bool) -> str:
    rows = [
        f"| {o.name} | `{o.command}` | {'ok' if o.returncode == 0 else f'FAILED (exit {o.returncode})'} "
        f"| {o.seconds:.0f} |"
        for o in outcomes
    ]
    table = "\n".join([
        "| benchmark | command | status | wall s |", "|---|---|---|---|", *rows,
    ])
    gpu = "\n".join(f"    {c}" for c in GPU_COMMANDS)
    return (
        "## All benchmarks (benchmarks/run_all.py)\n\n"
        f"Command: `{shlex.join(['python', 'benchmarks/run_all.py', *argv])}`  \n"
        f"Machine: {machine_line()}  \n"
        f"Date: {_dt.datetime.now(_dt.UTC):%Y-%m-%d %H:%M} UTC"
        + (" (quick: smoke sizes, not results)" if quick else "")
        + "\n\nEach benchmark below wrote its own section of this file (with its table, machine and "
        "command) and its PNG in docs/.\n\n"
        f"{table}\n\n"
        "GPU numbers: not measured here (no GPU in this workplace). On a CUDA machine run\n\n"
        f"{gpu}\n\n"
        "(throughput.py adds the GPU-only `medium` and `seed` presets on CUDA; distributed.py "
        "then uses nccl, one GPU per process).\n"
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke sizes; docs/ untouched unless --write-docs")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="run only this benchmark (repeatable; see --list)")
    ap.add_argument("--write-docs", action="store_true", help="write docs/ also with --quick")
    ap.add_argument("--no-docs", action="store_true", help="do not write docs/ (full runs write it by default)")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    ap.add_argument("--log-dir", type=Path, default=None, help="keep each benchmark's full output here")
    ap.add_argument("--bench-dir", type=Path, default=BENCH_DIR, help=argparse.SUPPRESS)
    ap.add_argument("--docs", type=Path, default=DOCS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    found = discover(args.bench_dir)
    if args.list:
        for name, path in found.items():
            print(f"{name:22s} {display([sys.executable, str(path)])}")
        return 0
    unknown = [n for n in args.only if n not in found]
    if unknown:
        print(f"run_all: error: no benchmark named {unknown[0]!r}; choose from {', '.join(found)}.",
              file=sys.stderr)
        return 2
    if args.write_docs and args.no_docs:
        print("run_all: error: --write-docs and --no-docs contradict each other.", file=sys.stderr)
        return 2
    write_docs = not args.no_docs and (args.write_docs or not args.quick)
    selected = {n: p for n, p in found.items() if not args.only or n in args.only}
    from tqdm.auto import tqdm

    outcomes: list[Outcome] = []
    bar = tqdm(selected.items(), desc="benchmarks", unit="bench")
    for name, script in bar:
        bar.set_description(name)
        cmd = command_for(name, script, args.quick, write_docs)
        outcome = run_one(name, cmd, args.log_dir)
        outcomes.append(outcome)
        status = "ok" if outcome.returncode == 0 else f"FAILED (exit {outcome.returncode})"
        tqdm.write(f"\n== {name}: {status} in {outcome.seconds:.0f} s: {outcome.command}\n{outcome.tail.rstrip()}")
    bar.close()
    if write_docs:
        from _docs import write_section

        write_section(args.docs, "run-all", section(outcomes, argv, args.quick))
        print(f"wrote {args.docs}")
    failed = [o.name for o in outcomes if o.returncode != 0]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
