# Two commands on a fresh machine:  make demo   and   make test
# torch is pinned and installed first. From plain PyPI on Linux x86_64, torch==2.13.0 is the
# CUDA build (several GB with its nvidia-* packages); on this project's CI machines a CPU build
# of it lies on local disk and pip takes that. On a laptop or CPU server, `make demo TORCH=cpu`
# takes the CPU build from PyTorch's CPU wheel index (falling back to plain PyPI when that index
# cannot be reached); a GPU user runs plain `make demo` (or installs the torch build matching
# the machine's CUDA first, then `pip install -e '.[hf,metrics,eval]'`).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= pinned
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
EXTRAS ?= dev,hf,metrics,eval

.PHONY: install demo test test-compat lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	@if [ "$(TORCH)" = "cpu" ]; then \
		$(PY) -m pip install --quiet --timeout 10 --retries 1 torch==$(TORCH_VERSION) --index-url $(TORCH_CPU_INDEX) \
		|| { echo "PyTorch's CPU index unreachable: installing torch==$(TORCH_VERSION) from PyPI"; \
		     $(PY) -m pip install --quiet torch==$(TORCH_VERSION); }; \
	else $(PY) -m pip install --quiet torch==$(TORCH_VERSION); fi
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
	$(COMPAT_VENV)/bin/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(COMPAT_VENV)/bin/python -m pip install --quiet 'transformers>=4.45,<4.50' 'peft<0.14' -e '.[$(EXTRAS)]'
	$(COMPAT_VENV)/bin/python -m pytest -q tests/test_hf.py tests/test_hf_recipes.py tests/test_controlled_generation.py tests/test_multiple_choice.py

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

bench: install
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) $(COMPAT_VENV) runs .pytest_cache
