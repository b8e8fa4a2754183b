# Two commands on a fresh machine:  make demo   and   make test
# torch is pinned first so that pip takes the CPU build instead of a multi-GB CUDA one.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
EXTRAS ?= dev,hf,metrics,eval

.PHONY: install demo test test-compat lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

demo: install
	$(VENV)/bin/neuroplastic demo

test: install
	$(PY) -m pytest -q

# The Hugging Face paths against the oldest supported transformers line (4.4x), in its own venv.
COMPAT_VENV ?= .venv-compat
test-compat:
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install --quiet $(TORCH)
	$(COMPAT_VENV)/bin/python -m pip install --quiet 'transformers>=4.45,<4.50' 'peft<0.14' -e '.[$(EXTRAS)]'
	$(COMPAT_VENV)/bin/python -m pytest -q tests/test_hf.py tests/test_hf_recipes.py tests/test_controlled_generation.py tests/test_multiple_choice.py

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

bench: install
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) $(COMPAT_VENV) runs .pytest_cache
