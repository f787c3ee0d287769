# botwall: `make test` and `make demo` set everything up on a fresh Debian 12
# machine (as root) and do nothing twice.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := .stamps

.PHONY: install test test-fast bench demo lint clean

install: $(STAMPS)/system $(STAMPS)/venv

$(STAMPS)/system: scripts/install-system.sh
	@mkdir -p $(STAMPS)
	bash scripts/install-system.sh
	@touch $@

# The venv must come from Debian's python3 (BCC's bindings live there) and see
# its site-packages.
$(STAMPS)/venv: pyproject.toml $(STAMPS)/system
	@mkdir -p $(STAMPS)
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

test: install
	bash scripts/install-system.sh
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not netns and not slow"

bench: install
	$(PY) -m bench.run

demo: install
	@echo "make demo arrives with the lab (issue: the lab). Until then: make test, make bench."

lint: install
	$(VENV)/bin/ruff check sensor controlplane lab tests bench
	$(VENV)/bin/mypy sensor controlplane

clean:
	rm -rf $(STAMPS) build *.egg-info
