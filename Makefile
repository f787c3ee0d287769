# botwall: `make test` and `make demo` set everything up on a fresh Debian 12
# machine (as root) and install nothing twice.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := .stamps

.PHONY: install system test test-fast test-vagrant bench demo lint clean

install: system $(STAMPS)/venv

# Idempotent: checks what is there, installs only what is missing, links the
# kernel headers BCC needs, mounts bpffs. Cheap enough to run every time.
system:
	@bash scripts/install-system.sh

# The venv must come from Debian's python3 (BCC's bindings live there) and see
# its site-packages; the PyPI package named "bcc" is unrelated and never used.
$(STAMPS)/venv: pyproject.toml scripts/install-system.sh scripts/debian-packages.txt
	@mkdir -p $(STAMPS)
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

test: install
	$(PY) -m pytest

# Without root or namespaces: fingerprints, replay, models.
test-fast: install
	$(PY) -m pytest -m "not kernel and not netns"

# The lab across three VMs (vagrant/): builds the box when its inputs change,
# starts libvirt, runs a short mixed scenario, checks it through the api VM's
# admin API, and leaves nothing running or defined. Report: vagrant-report/.
test-vagrant: install
	bash vagrant/test-vagrant.sh

bench: install
	$(PY) -m bench.run

# The main job: the lab for about two minutes (30 s of honest traffic while
# the agent learns, then the bad bots join), a live view, and the report.
DEMO_ARGS ?= --duration 120 --learning 30 --report lab-report
# A missed target (exit 3) is a result the report shows, not a broken demo.
demo: install
	$(VENV)/bin/botwall lab $(DEMO_ARGS); rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 3 ]

lint: install
	$(VENV)/bin/ruff check sensor controlplane lab tests bench
	$(VENV)/bin/mypy sensor controlplane

clean:
	rm -rf $(STAMPS) build *.egg-info
