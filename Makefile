# unitpipe: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# pyproject keeps a torch range for GPU clusters; constraints.txt pins the CPU build here.
# -qq: pip prints errors only (a machine's pip.conf may name local indexes that are absent,
# which pip reports once per package at -q).
PIP_INSTALL := $(PY) -m pip install -qq -c constraints.txt
# Every Ray port on loopback; no token needed by a head that tests start.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_AUTH_MODE := disabled

.PHONY: install demo test test-fast test-numerics bench lint clean

# The numerically sensitive tests run again under math-library settings that change float
# results on an AVX-512 Intel CPU (README, "Determinism"), so a test that holds only for one
# CPU's kernels fails here too. OpenBLAS's Haswell kernels need AVX2: set only where it is.
NUMERIC_TESTS := tests/units/features/test_kaldi.py tests/units/features/test_ssl.py \
	tests/units/kmeans/test_estimator.py tests/units/kmeans/test_stage.py tests/units/kmeans/test_pca.py \
	tests/units/kmeans/test_transport.py tests/units/kmeans/test_parts.py \
	tests/units/features/test_stage.py::test_mfcc_store_holds_the_sample_with_exact_frame_counts \
	tests/units/features/test_stage.py::test_a_tiny_hubert_from_a_local_directory_gives_its_layer \
	tests/units/labels/test_stage.py::test_every_utterance_gets_the_units_of_its_exact_features \
	tests/units/labels/test_stage.py::test_ssl_labels_follow_the_50hz_contract_on_odd_lengths \
	tests/units/labels/test_w2vu_stage.py::test_the_split_files_equal_the_steps_done_one_at_a_time \
	tests/units/bestrq/test_gaussian.py tests/units/bestrq/test_quantizer.py
HASWELL := $(shell grep -qw avx2 /proc/cpuinfo 2>/dev/null && echo OPENBLAS_CORETYPE=Haswell)
NUMERIC_AVX2 := MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(HASWELL)
NUMERIC_GENERIC := MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PIP_INSTALL) -e '.[cpu,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m pipelines.demo --workdir demo-output --fresh

test: install
	$(PY) -m pytest
	$(MAKE) --no-print-directory test-numerics

test-numerics: install
	env $(NUMERIC_AVX2) $(PY) -m pytest -q -m "not slow" $(NUMERIC_TESTS)
	env $(NUMERIC_GENERIC) $(PY) -m pytest -q -m "not slow" $(NUMERIC_TESTS)

test-fast: install
	$(PY) -m pytest -m "not slow"

# Benchmarks' baselines come with the dev extra: lhotse (the export tests read our Shar with
# it) and scikit-learn (the k-means tests score against it).
bench: install
	$(PY) bench/shards.py
	$(PY) bench/decode.py
	$(PY) bench/features.py
	$(PY) bench/kmeans.py
	$(PY) bench/label.py
	$(PY) bench/targets.py
	$(PY) bench/exports.py
	$(PY) bench/roots.py
	$(PY) bench/gpu.py
	$(PY) bench/determinism.py

lint: install
	$(PY) -m ruff check shards units pipelines tests bench

clean:
	rm -rf $(VENV) demo-output .pytest_cache
