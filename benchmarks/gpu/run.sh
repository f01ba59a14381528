#!/usr/bin/env bash
# The prepared GPU run: install carried wheels, export fp32 and fp16 bundles on CUDA (parity
# gate on), and time eager PyTorch (fp32, fp16) against ONNX Runtime CUDA (IO binding) for
# the encoders, the decoder and the audio LLM at base sizes. Writes results.json and report.md.
#
#   bash benchmarks/gpu/run.sh --stash DIR            keep DIR's wheels/parts for a later call
#   bash benchmarks/gpu/run.sh [--stash DIR] --out OUT   assemble, install, check, benchmark
#   bash benchmarks/gpu/run.sh --dry-run --out OUT       every step on this CPU machine: the
#        tiny preset, provider cpu, fp32 and fp16 variants, installs only printed
#   ... --out OUT -- --families wav2vec2 hubert         arguments after -- go to the benchmark
#
# Environment: STORE (default /tmp/lalm-wheels) holds stashed files between calls on one
# warm machine; SITE (default /tmp/lalm-site) is where the wheels are installed;
# LALM_CUDNN_CONV_ALGO_SEARCH is set from conv_probe.py (step 4).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$(pwd)
STORE=${STORE:-/tmp/lalm-wheels}
SITE=${SITE:-/tmp/lalm-site}
PYTHON=${PYTHON:-python3}
DRY=0; OUT=""; STASH=(); BENCH_ARGS=()
usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }
while (( $# )); do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT=${2:?--out needs a folder}; shift ;;
    --stash) STASH+=("${2:?--stash needs a folder}"); shift ;;
    --) shift; BENCH_ARGS=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run.sh: error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
step() { echo "== $*" >&2; }
fail() { echo "run.sh: error: $*" >&2; exit 1; }

step "1/5 stash carried files in $STORE"
mkdir -p "$STORE"
for dir in "${STASH[@]}"; do
  [[ -d $dir ]] || fail "--stash $dir is not a folder"
  cp -f "$dir"/* "$STORE"/ 2>/dev/null || true
  echo "   stashed $(ls "$dir" | wc -l) file(s) from $dir" >&2
done
[[ -n $OUT ]] || { echo "   nothing else to do without --out (stashed files stay while this machine is warm)" >&2; exit 0; }

step "2/5 assemble wheels carried in parts"
missing=0
for record in "$STORE"/*.whl.sha256; do
  [[ -e $record ]] || continue
  wheel=${record%.sha256}
  if [[ -f $wheel ]] && [[ $(sha256sum "$wheel" | awk '{print $1}') == $(cat "$record") ]]; then
    echo "   $(basename "$wheel"): already assembled" >&2; continue
  fi
  parts=("$wheel".part-*)
  [[ -e ${parts[0]} ]] || { echo "   $(basename "$wheel"): no parts yet" >&2; missing=1; continue; }
  cat "${parts[@]}" > "$wheel.tmp"
  if [[ $(sha256sum "$wheel.tmp" | awk '{print $1}') == $(cat "$record") ]]; then
    mv "$wheel.tmp" "$wheel"; echo "   $(basename "$wheel"): assembled from ${#parts[@]} parts" >&2
  else
    rm -f "$wheel.tmp"; echo "   $(basename "$wheel"): ${#parts[@]} part(s) so far, checksum not yet whole" >&2; missing=1
  fi
done
if (( missing && !DRY )); then fail "some wheels are incomplete; carry the remaining .whl/call-N folders with --stash first"; fi

step "3/5 install the wheels into $SITE"
wheels=("$STORE"/*.whl)
install=("$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE")
if [[ ! -e ${wheels[0]} ]]; then
  (( DRY )) || fail "no wheels in $STORE; run benchmarks/gpu/fetch_wheels.sh here and carry its folders"
  echo "   dry run: no wheels stashed; would run: ${install[*]} $STORE/*.whl" >&2
elif (( DRY )); then
  for wheel in "${wheels[@]}"; do "$PYTHON" -m zipfile -l "$wheel" > /dev/null || fail "$wheel is not a valid wheel"; done
  echo "   dry run: ${#wheels[@]} wheel(s) valid; would run: ${install[*]} $STORE/*.whl" >&2
else
  "${install[@]}" "${wheels[@]}"
  export PYTHONPATH="$SITE:$REPO"
fi
export PYTHONPATH="${PYTHONPATH:-$REPO}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

step "4/5 check the stack"
provider=cuda; preset=gpu; extra=()
if (( DRY )); then provider=cpu; preset=tiny; extra=(--variants fp32 fp16 --repeats 2); fi
"$PYTHON" - "$provider" <<'PY' || fail "the stack is not ready (see above)"
import sys
import onnxruntime as ort
import torch
import transformers
provider = sys.argv[1]
print(f"   torch {torch.__version__} (CUDA {torch.cuda.is_available()}), transformers {transformers.__version__}, "
      f"onnxruntime {ort.__version__} {ort.get_available_providers()}", file=sys.stderr)
import tomllib
from packaging.requirements import Requirement
with open("pyproject.toml", "rb") as f:  # the supported range, as the project declares it
    needed = next(r for r in map(Requirement, tomllib.load(f)["project"]["dependencies"]) if r.name == "transformers")
if transformers.__version__ not in needed.specifier:
    sys.exit(f"transformers {transformers.__version__}: this project needs transformers{needed.specifier} (carry the wheel)")
if provider == "cuda" and ("CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available()):
    sys.exit("no CUDA: onnxruntime-gpu or the GPU is missing")
# A session on the provider itself: a listed CUDA provider can still fail to load its libraries.
import tempfile, numpy as np, onnx
from onnx import helper
from runtime.sessions import SessionOptions, active_provider, create_session
graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "smoke",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
with tempfile.TemporaryDirectory() as tmp:
    path = f"{tmp}/smoke.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), path)
    session = create_session(path, SessionOptions(provider=provider))
    session.run(None, {"x": np.array([-1.0, 1.0], dtype=np.float32)})
if active_provider(session) != provider:
    sys.exit(f"a {provider} session fell back to {active_provider(session)}: CUDA libraries missing?")
print(f"   a {provider} session runs", file=sys.stderr)
PY

mkdir -p "$OUT"
# The cuDNN plan search that runs wav2vec2/HuBERT's positional convolution here (see conv_probe.py).
# ONNX Runtime prints its own CPU-fallback notices on stdout: the choice is the last line. A value already set wins.
search=$("$PYTHON" benchmarks/gpu/conv_probe.py --provider "$provider" --out "$OUT/conv_probe.json" | tail -n 1) || fail "the convolution probe failed (see above)"
search=${LALM_CUDNN_CONV_ALGO_SEARCH:-$search}
export LALM_CUDNN_CONV_ALGO_SEARCH=$search
echo "   cuDNN plan search for the benchmark: $search" >&2

step "5/5 benchmark ($preset preset, provider $provider)"
start=$(date +%s)
# The log and, after each family, gpu.partial.json land in OUT too: a run cut short keeps what it measured;
# a variant that fails is marked FAILED in the report, and the script still copies what was measured.
"$PYTHON" -m benchmarks run --preset "$preset" --provider "$provider" --allow-failures "${extra[@]}" ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"} --out "$OUT/gpu" --force 2>&1 | tee "$OUT/run.log"
cp "$OUT/gpu/results.json" "$OUT/results.json"
cp "$OUT/gpu/report.md" "$OUT/report.md"
echo "   done in $(( $(date +%s) - start )) s: $OUT/results.json and $OUT/report.md" >&2
