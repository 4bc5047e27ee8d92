# Every target sets up its own environment: a fresh machine needs only python3.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench style quality clean

$(STAMP): pyproject.toml requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned in the same command so pip never reaches for a CUDA build.
	$(PY) -m pip install --quiet -r requirements-test.txt -e ".[test]"
	# clean-fid without its dependencies: it declares torchvision, which would replace the pinned CPU torch; the
	# tests use only its resizer (cleanfid.resize), which needs numpy and PIL. The Inception network is not used here.
	$(PY) -m pip install --quiet --no-deps clean-fid==0.1.35
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) examples/demo.py --output_dir demo_output

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/inference.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/train_step.py

style: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks examples
	$(VENV)/bin/ruff check --fix src tests benchmarks examples

quality: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

clean:
	rm -rf $(VENV) build dist src/*.egg-info demo_output .pytest_cache
