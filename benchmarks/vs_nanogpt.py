"""Our GPT vs nanoGPT's model.py, side by side in one process.

Three models train on the same random batch: nanoGPT (karpathy's model.py), ours-matched
(``norm=layernorm, pos=learned``: nanoGPT's architecture) and ours-default (RMSNorm +
RoPE, what users get). Each has its own AdamW (betas 0.9/0.95, weight decay 0.1 on the 2-D
weights, ``fused=True`` on CUDA). After warm-up (which includes ``torch.compile``), rounds
alternate between the models (the order rotates every round) so machine noise hits all
alike; each model's tokens/s is the median over rounds, and the table gives the ratio to
nanoGPT. The load average is printed beside every table.

nanoGPT's model.py is never committed. It comes from ``--nanogpt PATH`` (a local copy of
karpathy/nanoGPT's model.py), else from a pinned PyPI wheel downloaded once into
``.bench_cache/nanogpt/`` (git-ignored; carry that folder to a machine without network):
lightning-thunder 0.2.6 ships nanoGPT's model.py as ``thunder/tests/nanogpt_model.py``,
with two edits of its own that this script reverts or neutralises: it sets
``nn.GELU(approximate="tanh")`` (reverted to nanoGPT's exact ``nn.GELU()``), and registers
the causal-mask buffer even when flash attention is used (never read on the SDPA path).

``--halves`` adds a fourth model, ours-default with ``model.rope_pairing=halves`` (the
default before 2026-12-06); ``--torch-forms`` adds ours-default on its PyTorch forms (the
fused C++ CPU kernels of ``neuroplastic.ops.native`` switched off for that model: what runs
where they cannot be built; eager CPU only, compiled models never take the kernels). Each
goes into its own docs section.

    python benchmarks/vs_nanogpt.py --device cpu --write-docs            # 4L/128 and 6L/384
    python benchmarks/vs_nanogpt.py --device cuda --write-docs           # GPT-2-124M, bf16
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import importlib.util
import inspect
import os
import platform
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from neuroplastic.config import ModelConfig  # noqa: E402
from neuroplastic.models.transformer import GPT  # noqa: E402
from neuroplastic.ops.native import native_disabled, native_ops  # noqa: E402

CACHE = ROOT / ".bench_cache" / "nanogpt"
WHEEL = "lightning_thunder-0.2.6-py3-none-any.whl"
WHEEL_REQ = "lightning-thunder==0.2.6"
WHEEL_SHA256 = "7b0bb904e5a162b0a2b762ce4652e1ad993b467f45f714b159b78d3bc94e2b9c"
MEMBER = "thunder/tests/nanogpt_model.py"
# thunder's own edits to karpathy's file, undone
PATCHES = [('self.gelu = nn.GELU(approximate="tanh")', "self.gelu = nn.GELU()")]

# name -> (n_layer, n_head, n_embd, block_size, batch_size, vocab_size)
CONFIGS = {
    "4L-128": (4, 4, 128, 64, 12, 65),  # nanoGPT's README CPU run (shakespeare_char)
    "6L-384": (6, 6, 384, 64, 12, 65),
    "gpt2-124M": (12, 12, 768, 1024, 16, 50304),
}
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # bf16 dense


def nanogpt_source(path: str | None) -> Path:
    """The path of nanoGPT's model.py: ``path`` as given, else the pinned wheel's copy
    (downloaded with pip once, checked against its sha256, patched back, cached)."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise SystemExit(f"--nanogpt {path}: no such file")
        return p
    out = CACHE / "model.py"
    if out.is_file():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    whl = CACHE / WHEEL
    if not whl.is_file():
        print(f"fetching nanoGPT's model.py: pip download {WHEEL_REQ} -> {CACHE}", flush=True)
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "-d", str(CACHE), WHEEL_REQ],
        )
        if done.returncode or not whl.is_file():
            raise SystemExit(
                f"could not download {WHEEL_REQ}: on a machine without network, carry "
                f"{CACHE.relative_to(ROOT)}/ from one that has it, or pass --nanogpt PATH"
            )
    digest = hashlib.sha256(whl.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{whl}: sha256 {digest} != pinned {WHEEL_SHA256}; delete it and retry")
    text = zipfile.ZipFile(whl).read(MEMBER).decode("utf-8")
    for old, new in PATCHES:
        if old not in text:
            raise SystemExit(f"{MEMBER} in {WHEEL} changed: {old!r} not found")
        text = text.replace(old, new)
    out.write_text(text, encoding="utf-8")
    return out


def load_nanogpt(path: Path):
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def adamw(model: torch.nn.Module, device: str) -> torch.optim.Optimizer:
    """nanoGPT's configure_optimizers, the same for every model."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    extra = {}
    if device == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters:
        extra["fused"] = True
    return torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), **extra)


def build(name: str, cfg: tuple, nano, device: str) -> torch.nn.Module:
    n_layer, n_head, n_embd, block, _, vocab = cfg
    if name == "nanoGPT":
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter count
            m = nano.GPT(nano.GPTConfig(block_size=block, vocab_size=vocab, n_layer=n_layer,
                                        n_head=n_head, n_embd=n_embd, dropout=0.0, bias=False))
    else:
        extra = {"ours-matched": {"norm": "layernorm", "pos": "learned"},
                 "ours-halves": {"rope_pairing": "halves"}}.get(name, {})  # ours-torch: default
        m = GPT(ModelConfig.from_flat(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=n_head,
                            n_embd=n_embd, dropout=0.0, bias=False, **extra))
    return m.to(device).train()


class Runner:
    def __init__(self, name, model, device, compile_, autocast, batch):
        self.name, self.model, self.device = name, model, device
        self.fwd = torch.compile(model) if compile_ else model
        self.opt = adamw(model, device)
        self.autocast = autocast
        self.x, self.y = batch
        self.tok_s: list[float] = []

    def step(self):
        with (native_disabled() if self.name == "ours-torch" else contextlib.nullcontext()), \
                torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
            _, loss = self.fwd(self.x, self.y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def timed(self, steps: int) -> float:
        sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync()
        return self.x.numel() * steps / (time.perf_counter() - t0)


def run_config(cname: str, cfg: tuple, nano, args, compile_: bool) -> list[str]:
    torch.manual_seed(0)
    _, _, _, block, batch, vocab = cfg
    x = torch.randint(0, vocab, (batch, block + 1), device=args.device)
    data = (x[:, :-1].contiguous(), x[:, 1:].contiguous())
    autocast = args.device == "cuda"
    names = ["nanoGPT", "ours-matched", "ours-default"] + extra_models(args)
    runners = []
    mode = "compiled" if compile_ else "eager"
    for name in names:
        torch.manual_seed(0)
        r = Runner(name, build(name, cfg, nano, args.device), args.device, compile_, autocast, data)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            r.step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        print(f"  [{cname} {mode}] {name}: warm-up {args.warmup} steps in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        runners.append(r)
    for rnd in range(args.rounds):
        order = runners[rnd % len(runners):] + runners[: rnd % len(runners)]
        for r in order:
            r.tok_s.append(r.timed(args.steps))
        if args.rounds > 10 and (rnd + 1) % 10:
            continue
        print(f"  [{cname} {mode}] round {rnd + 1}/{args.rounds}: " + ", ".join(
            f"{r.name} {r.tok_s[-1]:,.0f}" for r in runners) + " tok/s", flush=True)
    med = {r.name: statistics.median(r.tok_s) for r in runners}
    # ratio: median over rounds of the ratio within each round (measurements close in time
    # share the machine's load; robust where the load swings between rounds)
    ratio = {r.name: statistics.median(a / b for a, b in zip(r.tok_s, runners[0].tok_s))
             for r in runners}
    peak = next((v for k, v in PEAK_FLOPS.items() if k in _device_name(args.device)), None)
    cells = []
    for r in runners:
        cell = f"{med[r.name]:,.0f}" + ("" if r is runners[0] else f" ({ratio[r.name]:.3f}x)")
        if peak and args.device == "cuda":
            mfu = r.model.flops_per_token(block) if isinstance(r.model, GPT) else \
                runners[1].model.flops_per_token(block)
            cell += f", MFU {100 * mfu * med[r.name] / peak:.1f} %"
        cells.append(cell)
    load = "/".join(f"{v:.2f}" for v in os.getloadavg())
    row = f"| {cname} | {mode} | " + " | ".join(cells) + f" | {load} |"
    print(row, flush=True)
    return [row]


def extra_models(args) -> list[str]:
    return (["ours-halves"] if args.halves else []) + (["ours-torch"] if args.torch_forms else [])


EXTRA_COLUMNS = {"ours-halves": "ours-halves", "ours-torch": "ours-default on PyTorch forms"}


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--configs", default=None,
                    help=f"comma list of {', '.join(CONFIGS)} (default: cpu 4L-128,6L-384; cuda gpt2-124M)")
    ap.add_argument("--modes", default=None, help="eager,compile (default: cpu both; cuda compile)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (cpu 30, cuda 5)")
    ap.add_argument("--steps", type=int, default=None, help="steps per model per round (cpu 2, cuda 10)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per model (compiles)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--nanogpt", default=None, help="path to a local copy of nanoGPT's model.py")
    ap.add_argument("--tiny", action="store_true", help="a 2L/32 smoke config (tests the script)")
    ap.add_argument("--halves", action="store_true",
                    help="also ours-halves: the default with model.rope_pairing=halves (the default "
                         "before 2026-12-06), in its own docs section")
    ap.add_argument("--torch-forms", action="store_true",
                    help="also ours-torch: the default with the fused C++ CPU kernels switched off "
                         "(eager CPU), in its own docs section")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    if args.torch_forms:
        if cuda or "compile" in (args.modes or "eager,compile"):
            raise SystemExit("--torch-forms compares eager CPU runs: use --device cpu --modes eager")
        if native_ops() is None:
            raise SystemExit("--torch-forms: the fused C++ CPU kernels are not built here (see the warning)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    configs = (args.configs or ("gpt2-124M" if cuda else "4L-128,6L-384")).split(",")
    modes = (args.modes or ("compile" if cuda else "eager,compile")).split(",")
    args.rounds = args.rounds or (5 if cuda else 30)
    args.steps = args.steps or (10 if cuda else 2)
    if args.tiny:
        CONFIGS["tiny"] = (2, 2, 32, 16, 2, 65)
        configs = ["tiny"]
    src = nanogpt_source(args.nanogpt)
    nano = load_nanogpt(src)
    header = (f"{_device_name(args.device)}, torch {torch.__version__}, {_dt.date.today()}; "
              f"nanoGPT from {src.relative_to(ROOT) if src.is_relative_to(ROOT) else src}; "
              f"median of {args.rounds} alternating rounds of {args.steps} steps after "
              f"{args.warmup} warm-up steps; {'bf16 autocast, fused AdamW' if cuda else 'fp32'}.")
    print(header, flush=True)
    rows = []
    for cname in configs:
        for mode in modes:
            rows += run_config(cname, CONFIGS[cname], nano, args, mode == "compile")
    cfg_txt = "; ".join(
        f"{c}: {CONFIGS[c][0]}L/{CONFIGS[c][1]}H/{CONFIGS[c][2]}, block {CONFIGS[c][3]}, "
        f"batch {CONFIGS[c][4]}, vocab {CONFIGS[c][5]}" for c in configs)
    extras = extra_models(args)
    extra_col = "".join(f" {EXTRA_COLUMNS[m]} tok/s (ratio) |" for m in extras)
    table = "\n".join([
        "| config | mode | nanoGPT tok/s | ours-matched tok/s (ratio) | ours-default tok/s (ratio) |"
        f"{extra_col} load avg 1/5/15 min at end |",
        "|---|---|---|---|---|" + "---|" * len(extras) + "---|", *rows])
    print(table)
    if args.write_docs and not args.tiny:
        from _docs import write_section

        cmd = "python benchmarks/vs_nanogpt.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_section(
            ROOT / "docs" / "BENCHMARKS.md",
            f"vs-nanogpt-{args.device}" + "".join(f"-{m.split('-')[1]}" for m in extras),
            f"### vs nanoGPT, {args.device.upper()}"
            + (", with the halves RoPE pairing" if args.halves else "")
            + (", with the PyTorch forms (no fused C++ kernels)" if args.torch_forms else "")
            + " (benchmarks/vs_nanogpt.py)\n\n"
            f"Command: `{cmd.strip()}`\n\n{header} Configs: {cfg_txt}.\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
