# unitpipe: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# pyproject keeps a torch range for GPU clusters; constraints.txt pins the CPU build here.
PIP_INSTALL := $(PY) -m pip install -q -c constraints.txt
# Every Ray port on loopback; no token needed by a head that tests start.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_AUTH_MODE := disabled

.PHONY: install demo test test-fast bench lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP_INSTALL) -e '.[cpu,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m pipelines.demo --workdir demo-output --fresh

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

# Benchmarks install their baselines into the venv: lhotse is never a test dependency;
# scikit-learn already comes with the dev extra (the k-means tests score against it).
bench: install
	$(PIP_INSTALL) lhotse
	$(PY) bench/shards.py
	$(PY) bench/features.py
	$(PY) bench/kmeans.py
	$(PY) bench/label.py
	$(PY) bench/roots.py
	$(PY) bench/gpu.py

lint: install
	$(PY) -m ruff check shards units pipelines tests bench

clean:
	rm -rf $(VENV) demo-output .pytest_cache
