# Set-up and entry points. Every target creates .venv on first use, so a fresh clone needs only `make demo` / `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.roseprior-installed

.PHONY: demo test lint bench clean-venv

$(STAMP): pyproject.toml scripts/setup_venv.sh
	bash scripts/setup_venv.sh $(VENV)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/roseprior demo

# Test files run side by side (pytest-xdist), a file per worker so its module fixtures are built once.
test: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m benchmarks

clean-venv:
	rm -rf $(VENV)
