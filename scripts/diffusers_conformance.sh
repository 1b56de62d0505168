#!/usr/bin/env bash
# diffusers' own tests under safe-dit: run diffusers' test files for Lumina-Next, PixArt-Σ/α, SD3 and FLUX
# twice, stock and with safe-dit applied to every transformer they build (-p safe_dit_conformance), then
# report every stock-pass -> safe-dit-fail (scripts/conformance_report.py). Both runs load -p offline_hub
# (offline stand-ins for the hub's tiny test models; tests that still need the hub are skipped in both).
#
#   scripts/diffusers_conformance.sh DIFFUSERS_TESTS_DIR [OUT_DIR]
#
# DIFFUSERS_TESTS_DIR: a diffusers checkout's root (holding tests/) or its tests/ folder, e.g. from
#   git --git-dir=<diffusers.git> archive <rev> tests | tar -x -C /tmp/diffusers-tests
# OUT_DIR (default: ./conformance-out): junit XML per file and run, logs, summary.json, report.txt.
# Env: MODE (default dense-fp): the safe-dit mode of the second run; safe-core and safe-sw follow a pipeline's
#   scheduler, so they are applied to each pipeline call, and their default FILES are the pipeline tests only;
#   CONFIG: more SafeConfig fields as JSON, e.g. CONFIG='{"warmup_steps": 1}' (diffusers' pipeline tests sample
#   2 steps, all of them warm-up under the default schedule: with one warm-up step the second is selective);
#   FILES="tests/... tests/..." to run a subset (paths relative to the checkout root);
#   CONFORMANCE_DEPS (default /tmp/conformance-deps): where missing test-only deps (accelerate, parameterized,
#   requests-mock, psutil, pyyaml) are pip-installed with --target, so the main environment is left as is;
#   FILE_TIMEOUT (default 3600 s per file and run); REUSE_STOCK=1 keeps a stock run's XML already in OUT_DIR
#   (the stock run does not depend on MODE).
# Exit 0 only when no test that passes stock fails under safe-dit as a defect (see conformance_report.py).
set -uo pipefail

if [[ $# -lt 1 ]]; then
    sed -n '2,22p' "$0"; exit 2
fi
MODE=${MODE:-dense-fp}
case $MODE in dense-fp|safe-core|safe-sw) ;; *) echo "MODE must be dense-fp, safe-core or safe-sw, got $MODE" >&2; exit 2;; esac
ROOT=$(cd "$1" && pwd)
[[ -d "$ROOT/tests/pipelines" ]] || { [[ -d "$ROOT/pipelines" ]] && ROOT=$(dirname "$ROOT"); }
[[ -d "$ROOT/tests/pipelines" ]] || { echo "no tests/pipelines under $1" >&2; exit 2; }
OUT=$(mkdir -p "${2:-conformance-out}" && cd "${2:-conformance-out}" && pwd)
SCRIPTS=$(cd "$(dirname "$0")" && pwd)
DEPS=${CONFORMANCE_DEPS:-/tmp/conformance-deps}
FILE_TIMEOUT=${FILE_TIMEOUT:-3600}

DEFAULT_FILES="
tests/models/transformers/test_models_transformer_lumina.py
tests/pipelines/lumina/test_lumina_nextdit.py
tests/models/transformers/test_models_pixart_transformer2d.py
tests/pipelines/pixart_sigma/test_pixart.py
tests/pipelines/pixart_alpha/test_pixart.py
tests/models/transformers/test_models_transformer_sd3.py
tests/pipelines/stable_diffusion_3/test_pipeline_stable_diffusion_3.py
tests/models/transformers/test_models_transformer_flux.py
tests/pipelines/flux/test_pipeline_flux.py
"
if [[ $MODE != dense-fp ]]; then  # the transformer alone has no scheduler to follow: pipeline tests only
    DEFAULT_FILES=$(echo "$DEFAULT_FILES" | grep '^tests/pipelines/')
fi
FILES=${FILES:-$DEFAULT_FILES}

# test-only dependencies of diffusers' test utilities, kept out of the main environment
mkdir -p "$DEPS"
export PYTHONPATH="$SCRIPTS:$DEPS${PYTHONPATH:+:$PYTHONPATH}"
missing=()
for pair in accelerate:accelerate parameterized:parameterized requests_mock:requests-mock psutil:psutil yaml:pyyaml; do
    python -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "installing test-only deps into $DEPS: ${missing[*]}"
    python -m pip install --quiet --no-deps --target "$DEPS" "${missing[@]}" || { echo "pip install failed" >&2; exit 2; }
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false

mkdir -p "$OUT/stock" "$OUT/safe-dit"
: > "$OUT/safe-dit/calls.jsonl"
echo "$MODE${CONFIG:+ $CONFIG}" > "$OUT/safe-dit/mode"
run() {  # run MODE FILE
    local mode=$1 file=$2 tag xml log extra=()
    tag=$(echo "$file" | sed 's#^tests/##; s#\.py$##; s#/#__#g')
    xml="$OUT/$mode/$tag.xml"; log="$OUT/$mode/$tag.log"
    [[ $mode == safe-dit ]] && extra=(-p safe_dit_conformance)
    local t0=$SECONDS
    (cd "$ROOT" && SAFE_DIT_CONFORMANCE_MODE=$MODE SAFE_DIT_CONFORMANCE_CONFIG=${CONFIG:-} SAFE_DIT_CONFORMANCE_LOG="$OUT/safe-dit/calls.jsonl" timeout "$FILE_TIMEOUT" \
        python -m pytest -q -p no:cacheprovider -p offline_hub "${extra[@]}" -o junit_family=xunit1 \
        --junitxml="$xml" "$file" >"$log" 2>&1)
    local rc=$?
    echo "$mode $file: rc=$rc $((SECONDS - t0))s  $(grep -E '(passed|failed|skipped|error)' "$log" | tail -1)"
    if [[ $rc -eq 124 ]]; then echo "  TIMEOUT after ${FILE_TIMEOUT}s: $file incomplete" | tee -a "$OUT/incomplete.txt"; fi
}
: > "$OUT/incomplete.txt"
for f in $FILES; do
    [[ -f "$ROOT/$f" ]] || { echo "missing: $f" | tee -a "$OUT/incomplete.txt"; continue; }
    tag=$(echo "$f" | sed 's#^tests/##; s#\.py$##; s#/#__#g')
    if [[ ${REUSE_STOCK:-0} == 1 && -s "$OUT/stock/$tag.xml" ]]; then echo "stock $f: kept from $OUT/stock"
    else run stock "$f"; fi
    run safe-dit "$f"
done

python "$SCRIPTS/conformance_report.py" "$OUT" --root "$ROOT" --json "$OUT/summary.json" | tee "$OUT/report.txt"
exit "${PIPESTATUS[0]}"
