#!/usr/bin/env bash
# Run HERE (a machine that reaches PyPI): download the wheels the GPU machine lacks and pack
# them into call-sized folders under .whl/ (git-ignored), since one device call carries at
# most 64 MiB: wheels over PART_MB are split into parts, each folder holds at most PART_MB.
#   bash benchmarks/gpu/fetch_wheels.sh            # then: ls .whl/call-*
# Each device call carries one folder (carry: [".whl/call-N"]) and runs
#   bash benchmarks/gpu/run.sh --stash .whl/call-N            (calls 1 .. N-1)
#   bash benchmarks/gpu/run.sh --stash .whl/call-N --out $OUT (the last call: runs it all)
set -euo pipefail
cd "$(dirname "$0")/../.."
PART_MB=${PART_MB:-58}
DOWNLOAD=.whl/download
rm -rf .whl && mkdir -p "$DOWNLOAD"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$DOWNLOAD" -r benchmarks/gpu/requirements.txt
# Split large wheels; record each whole wheel's sha256 so the GPU machine can check the join.
for wheel in "$DOWNLOAD"/*.whl; do
  size_mb=$(( $(stat -c %s "$wheel") / 1048576 ))
  if (( size_mb > PART_MB )); then
    sha256sum "$wheel" | awk '{print $1}' > "$wheel.sha256"
    split -b "${PART_MB}M" -d -a 2 "$wheel" "$wheel.part-"
    rm "$wheel"
  fi
done
# Pack into call folders of at most PART_MB each, small files first.
call=1; used=0
mkdir -p ".whl/call-$call"
for file in $(ls -S -r "$DOWNLOAD"); do
  size=$(( ($(stat -c %s "$DOWNLOAD/$file") + 1048575) / 1048576 ))
  if (( used + size > PART_MB )); then
    call=$((call + 1)); used=0; mkdir -p ".whl/call-$call"
  fi
  mv "$DOWNLOAD/$file" ".whl/call-$call/"
  used=$((used + size))
done
rmdir "$DOWNLOAD"
echo "packed into $call call folder(s):"
du -sh .whl/call-* | sed 's/^/  /'
echo "carry .whl/call-1 ... .whl/call-$call, one per device call, on the same warm machine (see benchmarks/gpu/README.md)"
