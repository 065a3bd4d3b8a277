# LiveAvatar developer entry points. Each target sets itself up on a fresh machine (see infra/bootstrap.sh).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench clean

setup:
	@bash infra/bootstrap.sh

demo: setup
	$(PY) -m services.cli demo

# pytest exits 5 when it collected no test: that is a failure here, never a silent pass.
test: setup
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The unit tests with ATen, oneDNN and MKL capped at AVX2 (tests/numerics.py: no test may depend on one CPU's kernels).
# Own torch.compile cache: its key ignores ATEN_CPU_CAPABILITY, and AVX-512 kernels reused here give NaN.
# ISA_TESTS narrows the run (CI: the numerical tests of the models and stages).
ISA_TESTS ?= tests/unit
.PHONY: test-isa
test-isa: setup
	@ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
	TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/.run/inductor-avx2 $(PY) -m pytest -m unit $(ISA_TESTS) $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	@for b in bench/[!_]*.py; do \
	  if [ "$$b" = bench/gpu_bench.py ] && ! $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
	    echo "== $$b --tiny (no CUDA device here: the CPU dry run)"; $(PY) $$b --tiny || exit 1; continue; fi; \
	  echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf .run out .pytest_cache

# Container images and the local stack as containers, with podman (no Docker engine): docs/containers.md.
# `make images` bootstraps a Debian base locally and builds every image (nothing is pulled from a registry);
# `make containers-up` runs the chart's tiny CPU profile as containers; `make containers-down` removes them.
# test-containers builds the images and runs one session through the containers (slow: not part of `make test`).
.PHONY: container-tools images containers-up containers-status containers-down test-containers
container-tools:
	@bash infra/containers/install.sh

images: setup container-tools
	@$(PY) -m infra.containers.images

containers-up: setup container-tools
	@$(PY) -m infra.containers.stack up

containers-status: setup
	@$(PY) -m infra.containers.stack status

containers-down: setup
	@$(PY) -m infra.containers.stack down

test-containers: setup container-tools
	@LIVEAVATAR_CONTAINER_TESTS=1 $(PY) -m pytest tests/integration/test_containers.py $(PYTEST_ARGS)

# kind-e2e / kind-down: deploy the chart to a local kind cluster (needs Docker and kind; CI does not run it)
include infra/kind/Makefile.kind
