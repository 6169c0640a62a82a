#!/usr/bin/env bash
# The GPU check of fms-dyt (one GPU, at most 8 minutes): the tests marked `gpu` (tests/test_gpu.py)
# and the GPU benchmarks (bench/gpu_bench.py), written to one JSON file.
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
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ -z "$out" ]; then
  if [ "$dry_run" = 1 ]; then out="$work/gpu_check.json"; else out=bench/results/gpu_check.json; fi
fi
mkdir -p "$(dirname "$out")"

if [ "$dry_run" = 1 ]; then
  collected=$(python -m pytest --collect-only -q -m gpu tests/test_gpu.py | grep -c '::' || true)
  if [ "$collected" -lt 1 ]; then
    echo "gpu_check.sh: no test marked gpu was collected from tests/test_gpu.py" >&2
    exit 1
  fi
  python bench/gpu_bench.py --dry-run --out "$work/bench.json" > /dev/null
  python - "$out" "$work/bench.json" "$collected" <<'PY'
import json, sys
out, bench, collected = sys.argv[1], json.load(open(sys.argv[2])), int(sys.argv[3])
result = {"ran_on_gpu": False, "dry_run": True, "gpu_tests_collected": collected, "bench": bench}
open(out, "w").write(json.dumps(result, indent=2) + "\n")
print(json.dumps(result))
PY
  echo "gpu_check.sh: dry run only -- nothing ran on a GPU; $collected gpu test(s) collected, benchmark script checked$([ "$out_given" = 1 ] && echo "; wrote $out")"
  exit 0
fi

if ! python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check.sh: no CUDA GPU visible to torch here; run on a GPU machine, or use --dry-run" >&2
  exit 2
fi
set +e
timeout 300 python -m pytest -q -m gpu tests/test_gpu.py --junitxml="$work/tests.xml" | tail -20
tests_rc=${PIPESTATUS[0]}
timeout 180 python bench/gpu_bench.py --out "$work/bench.json"
bench_rc=$?
set -e
python - "$out" "$work" "$tests_rc" "$bench_rc" <<'PY'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
out, work, tests_rc, bench_rc = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
tests = {}
if (work / "tests.xml").exists():
    suite = ET.parse(work / "tests.xml").getroot().find("testsuite")
    tests = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
bench = json.loads((work / "bench.json").read_text()) if (work / "bench.json").exists() else None
result = {"ran_on_gpu": True, "tests_exit_code": tests_rc, "tests": tests, "bench_exit_code": bench_rc, "bench": bench}
open(out, "w").write(json.dumps(result, indent=2) + "\n")
print(json.dumps(result, indent=2))
PY
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
