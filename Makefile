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

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf .run out .pytest_cache

# kind-e2e / kind-down: deploy the chart to a local kind cluster (needs Docker and kind; CI does not run it)
include infra/kind/Makefile.kind
