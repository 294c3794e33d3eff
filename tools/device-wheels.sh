#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels of tools/device_wheels.txt for the GPU machine (CPython 3.12, manylinux
# x86-64) plus a DeepSpeed wheel built from its sdist without ops; a device call carries [".whl"] and
# slurm/repro-study.sh installs them into /tmp/site. Run from the project root, on a machine with PyPI access:
#   bash tools/device-wheels.sh            # download into .whl/ (replaces what is there)
#   bash tools/device-wheels.sh --check    # then install them into a clean Python 3.12 target and import them
# PYTHON312 (default: python3.12 on PATH, else pyenv's 3.12) runs the check.
set -euo pipefail
cd "$(dirname "$0")/.."
LIST=tools/device_wheels.txt
DEEPSPEED=deepspeed==0.19.8
requirements() { grep -v '^\s*#' "$LIST" | grep -v '^\s*$'; }

if [ "${1:-}" != "--check" ]; then
  grep -qx '/.whl/' .gitignore 2>/dev/null || grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  rm -rf .whl && mkdir -p .whl
  DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w .whl "$DEEPSPEED"
  mapfile -t reqs < <(requirements)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "${reqs[@]}"
  echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/ (the carry limit is 64 MiB in all)"
  exit 0
fi

# --check: every wheel installs for CPython 3.12, and datasets, sentencepiece and zstandard import and stream a
# local file with the image's packages stood in by PyPI's (torch is not installed, so deepspeed is only unpacked)
PY312=${PYTHON312:-}
if [ -z "$PY312" ]; then  # a python3.12 that runs (a pyenv shim may exist without one selected)
  for candidate in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    if "$candidate" --version >/dev/null 2>&1; then PY312=$candidate; break; fi
  done
fi
[ -n "$PY312" ] || { echo "no Python 3.12 found (set PYTHON312)"; exit 1; }
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
"$PY312" -m venv "$work/venv"
"$work/venv/bin/pip" install -q numpy pyarrow pyyaml tqdm filelock packaging huggingface_hub rich
"$work/venv/bin/pip" install -q --no-index --no-deps --no-compile --target "$work/site" .whl/*.whl
PYTHONPATH="$work/site:$PWD" "$work/venv/bin/python" - "$work" <<'PY'
import json, sys
from importlib.metadata import distributions, version
from pathlib import Path

import datasets, sentencepiece, zstandard, pandas, dill, multiprocess, xxhash  # noqa: F401  (import check)
from data_pipeline.sources import DocumentStream

work = Path(sys.argv[1])
with zstandard.open(work / "docs.jsonl.zst", "wt") as f:
    f.writelines(json.dumps({"text": f"document {i}"}) + "\n" for i in range(3))
texts = list(DocumentStream(str(work / "docs.jsonl.zst")))
assert texts == ["document 0", "document 1", "document 2"], texts
names = sorted({d.metadata["Name"].lower() for d in distributions(path=[str(work / "site")])})
print(f"python {sys.version.split()[0]}: {len(names)} wheels installed ({', '.join(names)}); datasets "
      f"{version('datasets')} streamed a local .jsonl.zst")
PY
