# make run: set up .venv and run the main job; make test: set up .venv and the browser, and run the tests.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; on a CUDA machine use e.g. `make TORCH=torch run`.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

# Debian's headless Chromium and its WebDriver, for the browser test of the MLflow UI (tests/test_ui_browser.py).
BROWSER_PACKAGES := chromium chromium-driver fonts-liberation
CHROMIUM ?= /usr/bin/chromium
CHROMEDRIVER ?= /usr/bin/chromedriver
APT_GET := DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=600

.PHONY: install browser run test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# Installs the browser with apt-get when chromium or chromedriver is missing (needs root; CI is). apt-get's output is
# shown; when `apt-get update` fails nothing is installed: the package lists may be stale or half-updated.
browser:
	@if [ ! -x $(CHROMIUM) ] || [ ! -x $(CHROMEDRIVER) ]; then \
	  if [ "$$(id -u)" -ne 0 ]; then \
	    echo "error: the browser test needs Debian's chromium and chromium-driver ($(CHROMIUM), $(CHROMEDRIVER))." >&2; \
	    echo "       Install them as root: run 'make browser' as root, or 'sudo apt-get install $(BROWSER_PACKAGES)'." >&2; \
	    exit 1; \
	  fi; \
	  echo "Installing $(BROWSER_PACKAGES) with apt-get, for the browser test..."; \
	  if ! $(APT_GET) update; then \
	    echo "error: apt-get update failed (its output is above): not installing $(BROWSER_PACKAGES) from stale package lists" >&2; \
	    exit 1; \
	  fi; \
	  if ! $(APT_GET) install -y --no-install-recommends $(BROWSER_PACKAGES); then \
	    echo "error: apt-get could not install $(BROWSER_PACKAGES) (its output is above)" >&2; \
	    exit 1; \
	  fi; \
	  echo "Installed $$($(CHROMIUM) --version 2>/dev/null) and $$($(CHROMEDRIVER) --version | cut -d' ' -f1-2)."; \
	fi

run: install
	$(BIN)/python flows.py train $(ARGS)

# Where the browser cannot be installed (not root, no network) the tests run without it: the browser test skips
# saying why, or fails where the browser is required (CI, or VAE_REQUIRE_BROWSER=1).
test: install
	@$(MAKE) --no-print-directory browser || echo "warning: no browser, so the browser test will skip (an error in CI or with VAE_REQUIRE_BROWSER=1); running the tests" >&2
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/engine_vs_plain_loop.py --epochs 10

clean:
	rm -rf $(VENV) outputs .pytest_cache
