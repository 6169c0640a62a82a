#!/usr/bin/env bash
# The GPU check of fms-dyt (one GPU, at most 15 minutes), written to one JSON file:
#   1. the sync-debug run: trainer steps with torch.cuda.set_sync_debug_mode("error") between log
#      steps, so that any device-to-host sync there fails the check (SYNC_TEST below);
#   2. the other tests marked `gpu` (tests/test_gpu.py); 3. the GPU benchmarks (bench/gpu_bench.py);
#   4. FP8 training's tokens/s against bf16 (bench/gpu_bench.py --only fp8: 9 compiled configurations).
#   bash bench/gpu_check.sh [--out FILE]             on a machine with a CUDA GPU
#                                                    (default bench/results/gpu_check.json)
#   bash bench/gpu_check.sh --dry-run [--out FILE]   anywhere: collects the tests, checks the script
#                                                    (default: the JSON goes to stdout only)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
dry_run=0
out=
out_given=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --out) out="$2"; out_given=1; shift ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --dry-run, --out FILE)" >&2; exit 2 ;;
  esac
  shift
done
SYNC_TEST=tests/test_gpu.py::test_no_device_sync_between_log_steps
commands=(
  "timeout 120 python -m pytest -q $SYNC_TEST"
  "timeout 300 python -m pytest -q -m gpu tests/test_gpu.py --deselect $SYNC_TEST"
  "timeout 180 python bench/gpu_bench.py --only norm,step,mfu,memory"
  "timeout 300 python bench/gpu_bench.py --only fp8"
)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ -z "$out" ]; then
  if [ "$dry_run" = 1 ]; then out="$work/gpu_check.json"; else out=bench/results/gpu_check.json; fi
fi
mkdir -p "$(dirname "$out")"

if [ "$dry_run" = 1 ]; then
  # What a CPU can check: this script and the Python it runs parse, the tests marked gpu are
  # collected (the sync-debug run among them), the benchmarks' configurations load.
  bash -n "$0"
  python -m py_compile tests/test_gpu.py bench/gpu_bench.py
  python -m pytest --collect-only -q -m gpu tests/test_gpu.py > "$work/collected.txt"
  collected=$(grep -c '::' "$work/collected.txt" || true)
  if [ "$collected" -lt 1 ]; then
    echo "gpu_check.sh: no test marked gpu was collected from tests/test_gpu.py" >&2
    exit 1
  fi
  if ! grep -qx "$SYNC_TEST" "$work/collected.txt"; then
    echo "gpu_check.sh: the sync-debug run $SYNC_TEST is not among the collected gpu tests" >&2
    exit 1
  fi
  python bench/gpu_bench.py --dry-run --out "$work/bench.json" > /dev/null
  for c in "${commands[@]}"; do echo "would run: $c"; done
  python - "$out" "$work/bench.json" "$collected" "$SYNC_TEST" "${commands[@]}" <<'PY'
import json, sys
out, bench, collected, sync_test, commands = sys.argv[1], json.load(open(sys.argv[2])), int(sys.argv[3]), sys.argv[4], sys.argv[5:]
result = {"ran_on_gpu": False, "dry_run": True, "gpu_tests_collected": collected, "sync_debug_test": sync_test,
          "commands": commands, "bench": bench}
open(out, "w").write(json.dumps(result, indent=2) + "\n")
print(json.dumps(result))
PY
  echo "gpu_check.sh: dry run only -- nothing ran on a GPU; $collected gpu test(s) collected (the sync-debug run among them), benchmark script checked$([ "$out_given" = 1 ] && echo "; wrote $out")"
  exit 0
fi

if ! python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check.sh: no CUDA GPU visible to torch here; run on a GPU machine, or use --dry-run" >&2
  exit 2
fi
set +e
${commands[0]} | tail -20
sync_rc=${PIPESTATUS[0]}
${commands[1]} --junitxml="$work/tests.xml" | tail -20
tests_rc=${PIPESTATUS[0]}
${commands[2]} --out "$work/bench.json"
bench_rc=$?
${commands[3]} --out "$work/fp8.json"
fp8_rc=$?
set -e
python - "$out" "$work" "$sync_rc" "$tests_rc" "$bench_rc" "$fp8_rc" <<'PY'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
out, work, sync_rc, tests_rc, bench_rc, fp8_rc = sys.argv[1], Path(sys.argv[2]), *map(int, sys.argv[3:7])
tests = {}
if (work / "tests.xml").exists():
    suite = ET.parse(work / "tests.xml").getroot().find("testsuite")
    tests = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
bench, fp8 = (json.loads((work / f).read_text()) if (work / f).exists() else None for f in ("bench.json", "fp8.json"))
result = {"ran_on_gpu": True, "sync_debug_exit_code": sync_rc, "tests_exit_code": tests_rc, "tests": tests,
          "bench_exit_code": bench_rc, "bench": bench, "fp8_exit_code": fp8_rc, "fp8": fp8}
open(out, "w").write(json.dumps(result, indent=2) + "\n")
print(json.dumps(result, indent=2))
PY
[ "$sync_rc" = 0 ] && [ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ] && [ "$fp8_rc" = 0 ]
