# The two commands: `make demo` (the built-in example end to end) and `make test`.
# Each creates .venv on first use and installs the project into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench-ci constraints clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[cpu,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m lalm_export.demo

test: $(STAMP)
	$(PY) -m pytest -q

constraints: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | grep -v '^lalm-export' > constraints.body
	{ head -n 2 constraints.txt; cat constraints.body; } > constraints.new && rm constraints.body && mv constraints.new constraints.txt

clean:
	rm -rf $(VENV) demo-output .pytest_cache
