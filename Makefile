# The two commands: `make demo` (the built-in example end to end) and `make test`.
# Each creates .venv on first use and installs the project into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: torchaudio espeak demo demo-real demo-spoken test test-slow test-avx2 lint bench-ci bench-baseline bench-base constraints clean

# The CI benchmark gate: tiny models, speedups over eager fp32 and parity compared with the
# committed baseline of this CPU's instruction set (benchmarks/baselines/tiny-ISA.json; with
# none, only parity and failed exports are checked, and the output says so). Tiny-model
# speedups vary up to ~17 % between runs on one machine, hence the 35 % tolerance; bf16
# speedups depend on the CPU's bf16 support, hence fp32 only.
BENCH_OUT ?= bench-output/tiny
BENCH_GATE := --tolerance 0.35 --figures "vs eager-fp32"

# PYTHONWARNINGS: setuptools announces every editable install in a box ("be careful with folders
# ... same name"), which pip >= 25 prints: advice for packagers, not for someone running the demo.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --quiet -c constraints.txt -e ".[cpu,serve,ray,dev]"
	$(MAKE) --no-print-directory torchaudio
	$(MAKE) --no-print-directory espeak
	touch $(STAMP)

# espeak-ng speaks the sentences of the long-recording tests (tests/runtime/test_longform.py), the
# optional spoken-digits demo and the real-weights audio LLM, whose sentences come from fortunes:
# installed where this user may (root with apt-get), else said.
espeak:
	@{ command -v espeak-ng >/dev/null && [ -d /usr/share/games/fortunes ]; } || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q espeak-ng fortunes >/dev/null; } || \
	  echo "espeak-ng or fortunes is not installed (apt-get install espeak-ng fortunes): the tests that speak will be skipped"

# torchaudio, for Granite Speech's processor (the tests' eager reference). The package index has
# no torchaudio built for torch 2.13: its newest, 2.11.1, is a CUDA build whose C++ extension
# cannot load here. Its Python transforms (the MelSpectrogram Granite uses) run on torch 2.13
# without it, and torchaudio skips the extension when its library files are absent.
TORCHAUDIO_LIB = $$($(PY) -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("torchaudio").origin).parent / "lib")')
torchaudio:
	$(PY) -m pip install --quiet --no-deps torchaudio==2.11.1
	rm -f $(TORCHAUDIO_LIB)/*.so
	$(PY) -c 'import torch, torchaudio; torchaudio.transforms.MelSpectrogram(n_fft=512, n_mels=80)(torch.zeros(400))'


demo: $(STAMP)
	$(PY) -m lalm_export.demo

# An audio LLM of real weights (Whisper tiny.en + SmolLM2-135M-Instruct) trained on espeak-ng speech
# (about 50 minutes on 2 cores, once: the model is kept in real-lalm-work/ and reused), then every
# precision's word error rate and speed (benchmarks/real_lalm.py; the committed run is
# benchmarks/results/real-lalm).
demo-real: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[real]"
	$(PY) -m benchmarks real-lalm --work real-lalm-work --out real-lalm-output --force

# The demo plus an audio LLM on digits spoken by espeak-ng (apt-get install espeak-ng; ~10 min more).
demo-spoken: $(STAMP)
	$(PY) -m lalm_export.demo --spoken-digits

# The fast suite; `make test-slow` runs the minutes-long end-to-end tests (marked slow). CI runs both.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The tests whose figures depend on the CPU's kernels (int8 recipes, the gate, the benchmarks), as
# on an AVX2-only CPU: CPUID masked on this one (benchmarks/cpu_mask; needs CPUID faulting and cc).
AVX2_TESTS := tests/precision/test_precision.py tests/precision/test_smoothing.py tests/export/test_lalm.py tests/demo/test_demo.py tests/runtime/test_cpu.py tests/benchmarks/test_run.py tests/benchmarks/test_compare.py
test-avx2: $(STAMP)
	benchmarks/cpu_mask/as_avx2.sh $(PY) -m pytest -q -p no:faulthandler -m "not slow" $(AVX2_TESTS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench-ci: $(STAMP)
	$(PY) -m benchmarks run --preset tiny --out $(BENCH_OUT) --force
	$(PY) -m benchmarks compare benchmarks/baselines $(BENCH_OUT)/results.json $(BENCH_GATE)

# Refresh this instruction set's baseline deliberately (after a change that is meant to move the figures):
# three runs, each speedup the lowest of them (the tiny audio LLM's moves 2x between processes).
bench-baseline: $(STAMP)
	for run in 1 2 3; do $(PY) -m benchmarks run --preset tiny --out $(BENCH_OUT)-$$run --force -q || exit 1; done
	mkdir -p benchmarks/baselines
	$(PY) -m benchmarks baseline $(BENCH_OUT)-1/results.json $(BENCH_OUT)-2/results.json $(BENCH_OUT)-3/results.json \
		--out benchmarks/baselines/tiny-$$($(PY) -c 'from runtime.cpu import isa_label; print(isa_label())').json

# The committed report of real architecture sizes (about 15 minutes on 2 cores).
bench-base: $(STAMP)
	$(PY) -m benchmarks run --preset base --out benchmarks/results/base --force

constraints: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | grep -v '^lalm-export' > constraints.body
	{ head -n 2 constraints.txt; cat constraints.body; } > constraints.new && rm constraints.body && mv constraints.new constraints.txt

clean:
	rm -rf $(VENV) demo-output bench-output real-lalm-output .pytest_cache
