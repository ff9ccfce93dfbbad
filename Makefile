# dicom-node: `make serve` runs the node, `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Real peers from Debian's packages, used by the tests and benchmarks.
PEERS := storescu:dcmtk dciodvfy:dicom3tools Orthanc:orthanc openssl:openssl chromium:chromium rsyslogd:rsyslog
# Peers that are files, not commands: Orthanc's DICOMweb plugin (the STOW-RS destination of
# tests/send/test_dicomweb.py and the OHIF viewer tests).
# rsyslog's TLS driver (the audit repository of the audit export tests).
# PostgreSQL's server programs (tests/postgres.py runs a throwaway cluster from them).
PEER_FILES := /usr/share/orthanc/plugins/libOrthancDicomWeb.so:orthanc-dicomweb \
  /usr/lib/*/rsyslog/lmnsd_gtls.so:rsyslog-gnutls \
  /usr/lib/postgresql/*/bin/pg_ctl:postgresql
# The OHIF viewer's prebuilt dist/ (npm package @ohif/app), cached outside git.
OHIF_VERSION := 3.13.2
# nnU-Net v2 and its network library, installed with --no-deps (see $(STAMP) below).
NNUNET_VERSION := 2.8.1
DNA_VERSION := 0.4.4
OHIF_DIR := .cache/ohif/$(OHIF_VERSION)

.PHONY: install serve test test-viewer ohif lint bench bench-throughput bench-workers fuzz peers clean \
  container-tools container-base container test-container

install: $(STAMP)

# torch is installed first and pinned: on a CPU-only machine this takes the local CPU build
# instead of several GB of CUDA wheels. A GPU host installs the CUDA build of torch 2.13.0
# into .venv before `make install` (README, "GPU hosts").
# nnU-Net v2 (to serve sites' nnU-Net models) comes without timm: dynamic-network-architectures
# requires timm only for its Primus/EVA networks, which nnU-Net's default U-Nets do not use, and
# timm pulls PyPI's torchvision, which fails to load beside a local torch build. nnunetv2's other
# requirements are pyproject.toml's `nnunet` extra; nnunetv2 and dynamic-network-architectures
# themselves come with --no-deps (so `pip check` names the missing timm).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip show torch >/dev/null 2>&1 || $(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev,nnunet]"
	$(BIN)/python -m pip install -q --no-deps "nnunetv2==$(NNUNET_VERSION)" \
	  "dynamic-network-architectures==$(DNA_VERSION)"
	touch $(STAMP)

peers:
	@missing=""; for p in $(PEERS); do \
	  command -v $${p%%:*} >/dev/null 2>&1 || PATH="$$PATH:/usr/sbin" command -v $${p%%:*} >/dev/null 2>&1 || missing="$$missing $${p##*:}"; \
	done; \
	for f in $(PEER_FILES); do test -e $${f%%:*} || missing="$$missing $${f##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing test peers from Debian's packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

serve: install
	$(BIN)/dicom-node serve --config config/node.yaml

ohif: $(OHIF_DIR)/dist/index.html

$(OHIF_DIR)/dist/index.html:
	rm -rf $(OHIF_DIR) && mkdir -p $(OHIF_DIR)
	cd $(OHIF_DIR) && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null \
	  && tar xzf ohif-app-$(OHIF_VERSION).tgz package/dist && mv package/dist dist \
	  && rm -rf package ohif-app-$(OHIF_VERSION).tgz
	test -f $@

# The suite without the browser tests (about 4 min); `make test-viewer` runs those (about 2 min).
test: install peers
	DICOM_NODE_REQUIRE_PEERS=1 $(BIN)/python -m pytest -q -p no:cacheprovider -m "not viewer and not container"

# OHIF 3.13 in headless Chromium over Orthanc's DICOMweb: our SEGs and SRs, judged from pixels;
# and the web console on a running node (login, a case and its thumbnail, retry).
test-viewer: install peers ohif
	DICOM_NODE_REQUIRE_PEERS=1 $(BIN)/python -m pytest -q -p no:cacheprovider -m viewer tests/viewer tests/console

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --cache-dir=/dev/null

bench: install peers
	$(BIN)/python -m benchmarks.receive
	$(BIN)/python -m benchmarks.la_lge
	$(BIN)/python -m benchmarks.audit_chain
	$(BIN)/python -m benchmarks.throughput --duration 120

# Sustained throughput for 10 minutes (issue 10's figure): DX + CT senders, one node, SQLite.
bench-throughput: install peers
	$(BIN)/python -m benchmarks.throughput --duration 600

# 1 versus 2 worker processes on a private PostgreSQL (jobs/s; docs/benchmarks.md).
bench-workers: install peers
	$(BIN)/python -m benchmarks.workers

# The long fuzz run (10,000 inputs, about 6 min): crashes, hangs, refused C-ECHOs, RSS.
fuzz: install
	DICOM_NODE_FUZZ_PDUS=6000 DICOM_NODE_FUZZ_DATA_SETS=4000 \
	  $(BIN)/python -m pytest -q -s -p no:cacheprovider -p no:logging --timeout 1800 tests/receive/test_fuzz.py

# The container (docs/deployment.md, "Container"), built and run with podman; no registry:
# the base is Debian bookworm made by debootstrap from Debian's mirror and imported.
IMAGE ?= localhost/dicom-node:latest
BASE_IMAGE ?= localhost/debian-base:bookworm
# crun cannot start containers on a cgroup v1/hybrid host: runc can.
PODMAN ?= podman$(if $(wildcard /sys/fs/cgroup/unified),$(if $(wildcard /usr/sbin/runc /usr/bin/runc), --runtime runc))
# the host's own open-files limit, and at most 32768 processes: podman's defaults (1048576
# files) exceed what some VMs allow, and there runc could not raise nproc past 32768 either
ULIMITS := --ulimit nofile=$(shell bash -c 'echo $$(ulimit -Sn):$$(ulimit -Hn)' | sed s/unlimited/-1/g) \
  --ulimit nproc=$(shell bash -c 'n=$$(ulimit -Hu); [ "$$n" != unlimited ] && [ "$$n" -lt 32768 ] || n=32768; echo $$n:$$n')
# pip in the build trusts what the host's pip trusts (a TLS-inspecting proxy's CA)
HOST_CA := $(or $(PIP_CERT),$(wildcard /etc/ssl/certs/ca-certificates.crt))

# podman (runc beside it), debootstrap and podman-compose from Debian's packages, when missing.
CONTAINER_TOOLS := podman:podman runc:runc debootstrap:debootstrap podman-compose:podman-compose

container-tools:
	@missing=""; for p in $(CONTAINER_TOOLS); do \
	  PATH="$$PATH:/usr/sbin" command -v $${p%%:*} >/dev/null 2>&1 || missing="$$missing $${p##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing container tools from Debian's packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

container-base: container-tools
	BASE_IMAGE=$(BASE_IMAGE) deploy/container/debian-base.sh

# The local CPU torch wheel (pip's find-links, e.g. /opt/wheels) goes into the build context;
# without one the build takes torch from PyTorch's CPU index.
container: container-base
	rm -f deploy/container/wheels/*.whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: -d deploy/container/wheels "torch==2.13.0+cpu" \
	  || echo "no local torch 2.13.0+cpu wheel: the build downloads it from PyTorch's CPU index"
	$(PODMAN) build --format docker $(ULIMITS) --build-arg BASE_IMAGE=$(BASE_IMAGE) \
	  $(if $(HOST_CA),-v $(realpath $(HOST_CA)):/run/host-ca.pem:ro --build-arg HOST_CA=/run/host-ca.pem) \
	  -t $(IMAGE) .
	$(PODMAN) image inspect $(IMAGE) --format 'built $(IMAGE): {{.Size}} bytes'

# Run the image and go through it from the host with DCMTK: C-ECHO, C-STORE of a radiograph,
# SEG + SR back to a storescp on the host, the health check, data kept across a restart.
test-container: container install peers
	DICOM_NODE_CONTAINER_IMAGE=$(IMAGE) DICOM_NODE_PODMAN="$(PODMAN)" DICOM_NODE_PODMAN_RUN="$(ULIMITS)" \
	  DICOM_NODE_REQUIRE_PEERS=1 \
	  $(BIN)/python -m pytest -q -p no:cacheprovider -m container tests/test_container.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .cache
