# distft developer commands. `make demo` and `make test` work on a fresh machine:
# they create .venv (CPU torch pinned when no NVIDIA GPU is present) if it is missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DISTFT := $(VENV)/bin/distft
PYTEST_ARGS ?=
# Test processes (pytest-xdist). A `distft train` launch is mostly a chain of single
# processes starting up, so 2 launches at a time use a 2-core machine; 0 runs in one process.
TEST_WORKERS ?= 2

.PHONY: venv demo test test-fast lint clean cluster-deps

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PY) -m pip install -q -e '.[dev]'; \
	else \
		$(PY) -m pip install -q -c constraints-cpu.txt -e '.[dev]'; \
	fi
	touch $@

# The tiny base is pre-trained once (.cache/tiny_pretrain; a rerun finds it finished and
# skips it), then fine-tuned twice: full and LoRA, each with a `task` and a `general` eval
# set (before -> after: what the fine-tune learned, and what it forgot). Then DPO on top
# of the full fine-tune: held-out preference accuracy before -> after.
demo: venv
	$(DISTFT) make-tiny .cache/tiny
	$(DISTFT) train examples/tiny_pretrain.yaml
	rm -rf runs/tiny_demo runs/tiny_demo_lora runs/tiny_dpo
	mkdir -p runs
	set -o pipefail; $(DISTFT) train examples/tiny_demo.yaml | tee runs/tiny_demo.txt
	set -o pipefail; $(DISTFT) train examples/tiny_demo_lora.yaml | tee runs/tiny_demo_lora.txt
	set -o pipefail; $(DISTFT) train examples/tiny_dpo.yaml | tee runs/tiny_dpo.txt
	@echo "== fine-tuning the pre-trained tiny model: eval loss before -> after =="
	@echo "full fine-tuning:"; grep "^eval " runs/tiny_demo.txt | sed 's/^/  /'
	@echo "LoRA:"; grep "^eval " runs/tiny_demo_lora.txt | sed 's/^/  /'
	@echo "== DPO on top of the full fine-tune: held-out pairs before -> after =="
	@grep "^eval " runs/tiny_dpo.txt | sed 's/^/  /'

test: venv cluster-deps
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Real Slurm + munge (tests/test_slurm.py) and iproute2 for the test hosts in network
# namespaces (tests/netns_fixture.py); Debian/Ubuntu as root, e.g. CI. Elsewhere those
# tests skip and say why.
CLUSTER_PKGS := slurmctld slurmd slurm-client munge iproute2
cluster-deps:
	@if command -v slurmctld >/dev/null && command -v munged >/dev/null && command -v ip >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(CLUSTER_PKGS); \
	else echo "cluster-deps: not root or no apt-get: the Slurm tests will be skipped"; fi

test-fast: venv
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check distft tests bench
	$(VENV)/bin/ruff format --check distft tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf runs .cache/tiny .cache/tiny_pretrain
