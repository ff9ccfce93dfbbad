# dicom-node: `make serve` runs the node, `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Real peers from Debian's packages, used by the tests and benchmarks.
PEERS := storescu:dcmtk dciodvfy:dicom3tools Orthanc:orthanc openssl:openssl

.PHONY: install serve test lint bench peers clean

install: $(STAMP)

# torch is installed first and pinned: on a CPU-only machine this takes the local CPU build
# instead of several GB of CUDA wheels. A GPU host installs the CUDA build of torch 2.13.0
# into .venv before `make install` (README, "GPU hosts").
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip show torch >/dev/null 2>&1 || $(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

peers:
	@missing=""; for p in $(PEERS); do \
	  command -v $${p%%:*} >/dev/null 2>&1 || PATH="$$PATH:/usr/sbin" command -v $${p%%:*} >/dev/null 2>&1 || missing="$$missing $${p##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing test peers from Debian's packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

serve: install
	$(BIN)/dicom-node serve --config config/node.yaml

test: install peers
	DICOM_NODE_REQUIRE_PEERS=1 $(BIN)/python -m pytest -q -p no:cacheprovider

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: install peers
	$(BIN)/python -m benchmarks.receive

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
