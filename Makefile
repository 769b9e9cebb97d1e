# Two commands matter: `make demo` (the pipeline on embedded defaults) and `make test`.
# Both build .venv from nothing when it is missing or pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SYSDEPS := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf

.PHONY: demo test lint format sysdeps venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch/torchvision pinned together: PyPI's torchvision does not import beside other torch builds.
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install -q -e '.[pipelines,models,dev]'
	touch $(STAMP)

venv: $(STAMP)

# Debian packages for the built-in datasets (Fashion-MNIST, Noto Color Emoji).
sysdeps:
	@missing=0; for f in $(SYSDEPS); do [ -e $$f ] || missing=1; done; \
	if [ $$missing = 1 ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist fonts-noto-color-emoji; \
	fi

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: venv sysdeps lint
	$(VENV)/bin/pytest -q -ra --durations=15 tests

demo: venv sysdeps
	$(PY) pipelines/demo.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache
