#!/usr/bin/env bash
# Download the wheels the GPU machine lacks for the device suite (benchmarks/device/run.sh).
#
# Run on an ordinary machine with PyPI access, from anywhere in the repository:
#
#     bash benchmarks/device/fetch_wheels.sh            # -> benchmarks/device/wheels/ (git-ignored)
#
# The GPU machine (an NVIDIA H200 running Python 3.12 at /opt/torch/.venv, with torch, torchvision, timm,
# h5py, tifffile, scikit-learn, pandas, scipy, matplotlib, pyyaml, pillow, pluggy, typer, rich, pytest,
# pytest-timeout and setuptools already installed) cannot reach any package registry, so whatever the suite
# imports beyond that travels with the working tree, which may hold 64 MiB in all. The suite needs only the
# wheels below. MLflow (tracking only) and scikit-survival (survival evaluation only) are left out on
# purpose: no benchmark and no gpu-marked test imports them, and MLflow alone would not fit.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEST="${1:-$ROOT/benchmarks/device/wheels}"
LIMIT_MIB=64

# name==version, one per line: exactly what the device lacks (versions as tested in the project's venv).
WHEELS=(
  pydantic==2.14.4            # every component's Options model
  pydantic-core==2.50.5       # pydantic's compiled core
  annotated-types==0.8.0      # pydantic
  typing-inspection==0.4.5    # pydantic
  typing-extensions==4.16.0   # pydantic-core needs >= 4.16, newer than the device may hold
  openslide-python==1.4.7     # slide reading (histobench.slides.reader, the CLAM-style baseline)
  openslide-bin==4.0.1.2      # the OpenSlide library itself
  imagecodecs==2026.3.6       # tifffile's JPEG codec: writing the synthetic pyramidal slides
)

if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY="${PYTHON:-python3}"; fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
# The device's glibc is recent (Ubuntu 24.04 image), so any manylinux tag up to 2_35 runs there; pip matches
# each --platform tag exactly, hence the list.
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_35_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$TMP" "${WHEELS[@]}"

count=$(find "$TMP" -name '*.whl' | wc -l)
if [[ "$count" -ne "${#WHEELS[@]}" ]]; then
  echo "fetch_wheels: expected ${#WHEELS[@]} wheels, got $count" >&2
  exit 1
fi

# Replace the folder's wheels as a whole: two versions of one package would stop the install on the device.
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
mv "$TMP"/*.whl "$DEST"/

wheel_bytes=$(find "$DEST" -name '*.whl' -printf '%s\n' | awk '{s += $1} END {print s + 0}')
# What travels besides the wheels: tracked files and untracked files that git does not ignore.
tree_bytes=$(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
  | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
for f in "$DEST"/*.whl; do printf '  %6.2f MiB  %s\n' "$(stat -c %s "$f" | awk '{print $1 / 1048576}')" "$(basename "$f")"; done
awk -v n="$count" -v w="$wheel_bytes" -v t="$tree_bytes" -v lim="$LIMIT_MIB" 'BEGIN {
  printf "wheels: %d files, %.1f MiB; working tree: %.1f MiB; together %.1f of %d MiB\n",
         n, w / 1048576, t / 1048576, (w + t) / 1048576, lim
}'
if (( wheel_bytes + tree_bytes > LIMIT_MIB * 1048576 )); then
  echo "fetch_wheels: wheels and working tree exceed the ${LIMIT_MIB} MiB that may travel to the device" >&2
  exit 1
fi
