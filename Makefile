# make run: set up .venv and run the main job; make test: set up .venv and the browser, and run the tests.
PYTHON ?= python3
VENV ?= .venv
# torch 2.13: the CPU build where pip finds that wheel on the machine (as on CI), else PyPI's (CUDA on Linux);
# `make TORCH=<requirement> run` installs another.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

# Debian's headless Chromium and its WebDriver, for the browser test of the MLflow UI (tests/test_ui_browser.py).
BROWSER_PACKAGES := chromium chromium-driver fonts-liberation
CHROMIUM ?= /usr/bin/chromium
CHROMEDRIVER ?= /usr/bin/chromedriver
APT_GET := DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=600

# Debian's PostgreSQL, for the tests of the team setup (tests/test_team_store.py): they run its initdb and postgres
# from /usr/lib/postgresql/<version>/bin in temporary directories; no cluster of the system's is used.
POSTGRESQL_PACKAGES := postgresql

# Shell for a recipe: apt-get install the packages $(1), apt-get's output shown only when the update or the install
# fails; nothing is installed from stale or half-updated package lists.
apt_install = log=$$(mktemp); \
	if ! $(APT_GET) update >$$log 2>&1; then \
	  tail -n 40 $$log >&2; rm -f $$log; \
	  echo "error: apt-get update failed (its output is above): not installing $(1) from stale package lists" >&2; \
	  exit 1; \
	fi; \
	if ! $(APT_GET) install -y --no-install-recommends $(1) >$$log 2>&1; then \
	  tail -n 40 $$log >&2; rm -f $$log; \
	  echo "error: apt-get could not install $(1) (the end of its output is above)" >&2; \
	  exit 1; \
	fi; \
	rm -f $$log

.PHONY: install browser postgresql run test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# Installs the browser with apt-get when chromium or chromedriver is missing (needs root; CI is).
browser:
	@if [ ! -x $(CHROMIUM) ] || [ ! -x $(CHROMEDRIVER) ]; then \
	  if [ "$$(id -u)" -ne 0 ]; then \
	    echo "error: the browser test needs Debian's chromium and chromium-driver ($(CHROMIUM), $(CHROMEDRIVER))." >&2; \
	    echo "       Install them as root: run 'make browser' as root, or 'sudo apt-get install $(BROWSER_PACKAGES)'." >&2; \
	    exit 1; \
	  fi; \
	  echo "Installing $(BROWSER_PACKAGES) with apt-get, for the browser test..."; \
	  $(call apt_install,$(BROWSER_PACKAGES)); \
	  echo "Installed $$($(CHROMIUM) --version 2>/dev/null) and $$($(CHROMEDRIVER) --version | cut -d' ' -f1-2)."; \
	fi

# Installs PostgreSQL with apt-get when no initdb is found (needs root; CI is). Without root it says what to run, and
# the PostgreSQL tests then skip with that reason (an error where CI is set).
postgresql:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then \
	  if [ "$$(id -u)" -ne 0 ]; then \
	    echo "warning: the team-setup tests need Debian's PostgreSQL server (initdb and postgres), which is not installed." >&2; \
	    echo "         Install it as root: run 'make postgresql' as root, or 'sudo apt-get install $(POSTGRESQL_PACKAGES)'." >&2; \
	    exit 0; \
	  fi; \
	  echo "Installing $(POSTGRESQL_PACKAGES) with apt-get, for the team-setup tests..."; \
	  $(call apt_install,$(POSTGRESQL_PACKAGES)); \
	  echo "Installed $$(ls -d /usr/lib/postgresql/*/bin/postgres | tail -n 1) ($$($$(ls -d /usr/lib/postgresql/*/bin/postgres | tail -n 1) --version))."; \
	fi

run: install
	$(BIN)/python flows.py train $(ARGS)

# Where the browser or PostgreSQL cannot be installed (not root, no network) the tests run without it: the tests
# that need it skip saying why, or fail where it is required (CI, or VAE_REQUIRE_BROWSER=1 / VAE_REQUIRE_POSTGRESQL=1).
test: install
	@$(MAKE) --no-print-directory browser || echo "warning: no browser, so the browser test will skip (an error in CI or with VAE_REQUIRE_BROWSER=1); running the tests" >&2
	@$(MAKE) --no-print-directory postgresql || echo "warning: no PostgreSQL, so the team-setup tests will skip (an error in CI); running the tests" >&2
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/engine_vs_plain_loop.py --epochs 10

clean:
	rm -rf $(VENV) outputs .pytest_cache
