#!/usr/bin/env bash
# The GPU checks of issue 17, as ONE script for a CUDA machine without network (H200:
# python3 3.12, torch 2.11+cu130, triton 3.6; flash-linear-attention is not installed
# there, so its wheels travel in .whl/). Each step runs under its own timeout, prints as it
# goes, and is tee'd to $OUT/<step>.log (or ./gpu_checks_out/ when OUT is unset).
#
# Prepare here (network) once, in the checkout that will be sent:
#     bash benchmarks/gpu_checks.sh --prepare    # .whl/ (fla wheels), .bench_cache/ (nanoGPT)
# Run there (carry .whl and .bench_cache):
#     bash benchmarks/gpu_checks.sh
# Smoke-test the script on a CPU machine (tiny sizes, no fla):
#     SMOKE=1 bash benchmarks/gpu_checks.sh
#
# Steps (the lead appends more below the marked line):
#   a) benchmarks/vs_nanogpt.py --device cuda          GPT-2-124M, bf16, compile   <= 240 s
#   a2) the same, eager, with --halves (the old RoPE pairing beside the default)   <= 120 s
#   b) benchmarks/fast_weight.py --vs-fla              B4 H8 T4096 d64 fwd+bwd      <= 120 s
#   c) neuroplastic-llm-seed, 30 steps, train.compile=true: tokens/s and MFU       <= 90 s
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-python3}
OUTDIR=${OUT:-$ROOT/gpu_checks_out}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}

if [ "${1:-}" = "--prepare" ]; then
    set -e
    mkdir -p .whl
    $PY -m pip download --no-deps --only-binary=:all: -d .whl \
        flash-linear-attention==0.6.0 fla-core==0.6.0
    $PY benchmarks/vs_nanogpt.py --tiny --modes eager --rounds 1 --steps 1 >/dev/null
    ls -la .whl .bench_cache/nanogpt
    exit 0
fi

SMOKE=${SMOKE:-0}
if [ "$SMOKE" = 1 ]; then DEV=cpu; else DEV=cuda; fi

ONLY=${ONLY:-}  # e.g. ONLY="vs_nanogpt llm_seed": run only these steps
step() {  # step NAME SECONDS CMD...: run under timeout, tee to $OUTDIR/NAME.log
    local name=$1 secs=$2
    shift 2
    if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
    echo "=== [$name] (timeout ${secs}s): $*"
    local t0=$SECONDS
    timeout --signal=TERM --kill-after=10 "$secs" "$@" 2>&1 | tee "$OUTDIR/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== [$name] rc=$rc in $((SECONDS - t0)) s"
}

echo "=== machine: $(date -u +%FT%TZ)"
$PY - <<'EOF'
import torch, platform
print("python", platform.python_version(), "torch", torch.__version__,
      "cuda", torch.version.cuda, "device",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

# carried wheels (fla), installed into /tmp/site without network
if ls .whl/*.whl >/dev/null 2>&1 && [ "$SMOKE" != 1 ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
$PY -c "import fla, einops; print('fla', fla.__version__)" 2>&1 | tail -1

# a) nanoGPT vs ours (GPT-2-124M, bf16 autocast, torch.compile, fused AdamW)
if [ "$SMOKE" = 1 ]; then
    step vs_nanogpt 150 $PY benchmarks/vs_nanogpt.py --device cpu --tiny --modes eager --rounds 2 --steps 1
else
    # alone: three compilations took > 150 s while the suite shared the machine (2026-12-04)
    step vs_nanogpt 240 $PY benchmarks/vs_nanogpt.py --device cuda --rounds 3 --steps 10
fi

# a2) the same eager (bf16 autocast), with the halves RoPE pairing beside the default: the
#     eager CUDA path of the interleaved default (2026-12-06) has not been timed on a GPU
if [ "$SMOKE" = 1 ]; then
    step vs_nanogpt_eager 120 $PY benchmarks/vs_nanogpt.py --device cpu --tiny --modes eager --halves --rounds 2 --steps 1
else
    step vs_nanogpt_eager 120 $PY benchmarks/vs_nanogpt.py --device cuda --modes eager --halves --rounds 5 --steps 10
fi

# b) fast-weight memory: our torch forms (fp32, bf16) vs our fla dispatch vs fla direct
if [ "$SMOKE" = 1 ]; then
    step fast_weight_fla 120 $PY benchmarks/fast_weight.py --vs-fla --device cpu --fla-shape 1,2,256,16 --repeats 2
else
    step fast_weight_fla 120 $PY benchmarks/fast_weight.py --vs-fla --device cuda --repeats 5
fi

# c) neuroplastic-llm-seed (1.3B): 30 steps, compiled, grad_accum 1, reward generation off;
#    Trainer.train(stop_at=30), so no 16 GB checkpoint is written at the end. The trainer
#    logs tokens/s and MFU every 10 steps (the first window includes compilation).
if [ "$SMOKE" = 1 ]; then
    # compiling on a shared CPU takes minutes: the smoke run checks the rest eagerly
    SEED_RECIPE=tiny SEED_DEVICE=cpu SEED_LOG=2 SEED_STEPS=6 SEED_COMPILE=false
else
    SEED_RECIPE=neuroplastic-llm-seed SEED_DEVICE=cuda SEED_LOG=10 SEED_STEPS=30 SEED_COMPILE=true
fi
step llm_seed 90 $PY - "$SEED_RECIPE" "$SEED_DEVICE" "$SEED_LOG" "$SEED_STEPS" "$SEED_COMPILE" <<'EOF'
import json, sys, tempfile
from neuroplastic.config import load_config
from neuroplastic.training.trainer import Trainer

recipe, device, log_every, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
out = tempfile.mkdtemp(prefix="gpu-checks-seed-")
cfg = load_config(recipe, [
    f"train.device={device}", f"train.compile={sys.argv[5]}", "train.grad_accum=1",
    f"train.log_interval={log_every}", "train.max_steps=100000", "reward.interval=0",
    "train.eval_interval=0", "train.ckpt_interval=0", "train.progress=false",
    "train.tensorboard=false", f"train.out_dir={out}",
])
t = Trainer(cfg).setup()
print(f"{recipe}: {sum(p.numel() for p in t.model.parameters()) / 1e6:.1f}M parameters, "
      f"batch {cfg.train.batch_size} x {t.block_size}, amp {cfg.train.amp}", flush=True)
# in segments of log_every steps, so that each line is printed as soon as it is measured
# (the first segment includes compilation); the trainer's own log follows
while t.step < steps:
    s = t.train(stop_at=min(steps, t.step + log_every))
    mfu = "n/a" if s.get("mfu") is None else f"{100 * s['mfu']:.1f} %"
    print(f"steps to {s['step']}: {s['tokens_per_s']:,.0f} tokens/s, MFU {mfu} (trainer's summary)",
          flush=True)
for line in open(t.logger.path, encoding="utf-8"):
    r = json.loads(line)
    if "tokens_per_s" in r:
        mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f} %"
        print(f"metrics.jsonl step {r['step']:4d}: {r['tokens_per_s']:,.0f} tokens/s, MFU {mfu}, "
              f"loss {r.get('loss', float('nan')):.4f}")
EOF

# ---- the lead's steps go below this line ----
