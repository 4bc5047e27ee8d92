# Every target sets up its own environment: a fresh machine needs only python3.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install browser demo demo-sd3 test bench style quality clean

$(STAMP): pyproject.toml requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned in the same command so pip never reaches for a CUDA build.
	$(PY) -m pip install --quiet -r requirements-test.txt -e ".[test]"
	# clean-fid without its dependencies: it declares torchvision, which would replace the pinned CPU torch; the
	# tests use only its resizer (cleanfid.resize), which needs numpy and PIL. The Inception network is not used here.
	$(PY) -m pip install --quiet --no-deps clean-fid==0.1.35
	# gradio for the web app's tests, without its dependencies: it declares pillow<13, which would replace the pinned
	# pillow; its other requirements are in requirements-test.txt. (Users get it with `pip install ".[app]"`.)
	$(PY) -m pip install --quiet --no-deps gradio==6.31.0 gradio_client==2.7.2 hf-gradio==0.4.1
	touch $(STAMP)

install: $(STAMP)

# Debian's chromium and chromedriver for the browser test (tests/test_app.py), installed only when missing. If apt-get
# fails the suite still runs and that test fails, saying what is missing.
APT_GET := $(if $(filter 0,$(shell id -u)),,sudo -n )apt-get
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; else \
		echo "installing chromium and chromium-driver (apt) for the browser test"; \
		( $(APT_GET) update -qq && DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq chromium chromium-driver ) \
		|| echo "WARNING: could not install chromium + chromium-driver: tests/test_app.py's browser test will fail"; \
	fi

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) examples/demo.py --output_dir demo_output

# the same with the flow-matching (SD3-architecture) shapes teacher and train_disback_sd3.py
demo-sd3: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) examples/demo.py --family sd3 --output_dir demo_output_sd3

# two test workers (pytest-xdist), each file on one worker (its module fixtures are built once), every process on one
# thread: two 2-thread processes on 2 cores slow torch several times over
TEST_WORKERS ?= 2
test: $(STAMP) browser
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/inference.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/train_step.py

# the docs' result tables, copied from the committed benchmarks/results/*.md (a benchmark's run updates both)
docs-results: $(STAMP)
	$(PY) benchmarks/common.py --update-docs

style: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks examples
	$(VENV)/bin/ruff check --fix src tests benchmarks examples

quality: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) build dist src/*.egg-info demo_output demo_output_sd3 .pytest_cache
