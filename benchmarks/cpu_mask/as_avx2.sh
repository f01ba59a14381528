#!/usr/bin/env bash
# Run a command as on an AVX2-only x86 CPU (AMD Zen 2/3, many Intel servers and laptops), at
# native speed, on a CPU with AVX-512: CPUID is made to fault (the kernel's CPUID faulting,
# ARCH_SET_CPUID) and a preloaded library answers it without the AVX-512, VNNI, BF16 and AMX
# bits. ONNX Runtime (MLAS), PyTorch, oneDNN and MKL read CPUID to pick their kernels, so they
# take their AVX2 paths; /proc/cpuinfo still lists the host's flags, so LALM_CPU_FLAGS tells
# lalm-export and the runtime the masked ones. A program that installs its own SIGSEGV handler
# takes the trapped CPUID for a crash: keep Python's faulthandler off (pytest -p no:faulthandler);
# Ray's gcs_server (abseil's failure handler) dies under it, so Ray cannot run masked. Timings
# are of this CPU's cores running AVX2 code, not of an AVX2-only CPU's.
#
#   benchmarks/cpu_mask/as_avx2.sh COMMAND [ARGS...]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if ! grep -qw cpuid_fault /proc/cpuinfo 2>/dev/null; then
  echo "as_avx2: this machine has no CPUID faulting (no cpuid_fault flag in /proc/cpuinfo): AVX-512 cannot be masked here" >&2
  exit 3
fi
if ! command -v cc > /dev/null; then
  echo "as_avx2: no C compiler (cc) to build the CPUID shim; apt-get install gcc" >&2
  exit 3
fi
lib="${TMPDIR:-/tmp}/lalm-avx2only-$(id -u).so"
if [[ ! -e $lib || $here/avx2only.c -nt $lib ]]; then
  cc -O2 -shared -fPIC -o "$lib.tmp" "$here/avx2only.c" && mv "$lib.tmp" "$lib"
fi
flags=$(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2 | tr ' ' '\n' | grep -v -E '^(avx512|avx_vnni|amx)' | tr '\n' ' ')
export LALM_CPU_FLAGS="$flags"
export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"
exec "$@"
