# make run: set up .venv and run the main job; make test: set up .venv and the browser, and run the tests.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; on a CUDA machine use e.g. `make TORCH=torch run`.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

# Debian's headless Chromium and its WebDriver, for the browser test of the MLflow UI (tests/test_ui_browser.py).
BROWSER_PACKAGES := chromium chromium-driver fonts-liberation
APT_GET := DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=600

# Debian's PostgreSQL, for the tests of the team setup (tests/test_team_store.py): they run its initdb and postgres
# from /usr/lib/postgresql/<version>/bin in temporary directories; no cluster of the system's is used.
POSTGRESQL_PACKAGES := postgresql

# Shell for a recipe: apt-get install the packages $(1), its output shown only when the update or the install fails.
apt_install = log=$$(mktemp); \
	if ! { $(APT_GET) update && $(APT_GET) install -y --no-install-recommends $(1); } >$$log 2>&1; then \
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

# Installs the browser with apt-get when /usr/bin/chromium or /usr/bin/chromedriver is missing (needs root; CI is).
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" -ne 0 ]; then \
	    echo "error: the browser test needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)." >&2; \
	    echo "       Install them as root: run 'make browser' as root, or 'sudo apt-get install $(BROWSER_PACKAGES)'." >&2; \
	    exit 1; \
	  fi; \
	  echo "Installing $(BROWSER_PACKAGES) with apt-get, for the browser test..."; \
	  $(call apt_install,$(BROWSER_PACKAGES)); \
	  echo "Installed $$(/usr/bin/chromium --version 2>/dev/null) and $$(/usr/bin/chromedriver --version | cut -d' ' -f1-2)."; \
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

test: install browser postgresql
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/engine_vs_plain_loop.py --epochs 10

clean:
	rm -rf $(VENV) outputs .pytest_cache
