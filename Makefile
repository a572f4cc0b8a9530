# Two commands do everything, set-up included:
#   make run    the study on the shipped trained models (PRESET=quick: everything from scratch)
#   make test   the test suite (make test-fast: without the slow tests, for the edit-test loop)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PRESET ?= trained
OUT ?= runs/$(PRESET)
# where torch comes from: empty is pip's usual index (see the torch line below)
TORCH_INDEX ?=

.PHONY: run test test-fast setup browser clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned, so nothing installed after it picks another version. On a stock Linux
	# machine the pin alone resolves to PyPI's CUDA build (several GB; it also runs on CPUs);
	# TORCH_INDEX=https://download.pytorch.org/whl/cpu installs the CPU build instead.
	$(BIN)/pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# Debian's chromium renders the study report in a test, and chromium-driver lets Selenium drive the
# page of `minidiff serve` in another; installed where we may (root + apt-get).
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null || \
	      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; }; } || \
	  echo "note: chromium is not installed (needs root and apt-get): the report-rendering test is skipped"
	@command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium-driver >/dev/null || \
	      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium-driver >/dev/null; }; }; } || \
	  echo "note: chromedriver is not installed (needs root and apt-get): the serve page's browser test is skipped"

run: $(STAMP)
	$(BIN)/minidiff run --preset $(PRESET) --out $(OUT)

# one pytest-xdist worker per core (2 on the CI machine); a test file stays on one worker, so its
# module-scoped fixtures (a smoke study, a trained run) are built once
test: $(STAMP) browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

# the edit-test loop: everything but the tests marked slow (studies, kills, shipped-card
# reproductions, two-process runs, browsers), in under 2 minutes on 2 cores
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow"

clean-venv:
	rm -rf $(VENV)
