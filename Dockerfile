# dicom-node container: CPU build by default; everything comes from Debian's and Python's
# package indexes, the model weights are in the image (config/models), nothing is downloaded
# at run time. `make container` builds it with podman on a Debian base made by debootstrap
# (deploy/container/debian-base.sh); `make test-container` runs it (docs/deployment.md).
#
#   podman build --build-arg BASE_IMAGE=localhost/debian-base:bookworm -t dicom-node .
#   podman run -d -p 11112:11112 -v dicom-node-data:/var/lib/dicom-node \
#       -v $PWD/config/node.yaml:/etc/dicom-node/node.yaml:ro dicom-node
#
# BASE_IMAGE: any Debian bookworm image (debian:bookworm-slim where a registry is reachable).
# Torch: the CPU build of torch 2.13.0. A wheel file torch-2.13.0+cpu-*.whl in
# deploy/container/wheels/ (not in git; `make container` puts it there) is installed as is;
# without one it comes from TORCH_INDEX. GPU hosts: build with
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
# (the CUDA wheels, several GB more) and run with --gpus all / --device nvidia.com/gpu=all.
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# a CA bundle for pip behind a TLS-inspecting proxy (mounted by `make container`, not kept)
ARG HOST_CA=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_DEFAULT_TIMEOUT=120
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/dicom-node/.venv
ENV PATH=/opt/dicom-node/.venv/bin:$PATH
COPY deploy/container/wheels/ /wheels/
RUN set -eu; [ -z "$HOST_CA" ] || export PIP_CERT="$HOST_CA"; \
    wheel=$(ls /wheels/torch-${TORCH_VERSION}+cpu-*.whl 2>/dev/null | head -n 1 || true); \
    case "$TORCH_INDEX" in \
      */cpu) if [ -n "$wheel" ]; then pip install "$wheel"; \
             else pip install --index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple \
                  "torch==${TORCH_VERSION}+cpu"; fi; \
             python -c "import torch; assert torch.version.cuda is None, torch.version.cuda"; \
             if pip list 2>/dev/null | grep -i '^nvidia-'; then \
                 echo "a CPU build must not hold CUDA wheels" >&2; exit 1; fi ;; \
      *) pip install --index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple \
             "torch==${TORCH_VERSION}" ;; \
    esac
# the dependencies alone (a stub package of the same pyproject.toml): this layer stays cached
# while only the code or the README change; the code is installed in the last stage
COPY pyproject.toml /src/
RUN [ -z "$HOST_CA" ] || export PIP_CERT="$HOST_CA"; \
    mkdir /src/dicom_node && touch /src/dicom_node/__init__.py /src/README.md \
    && pip install "setuptools>=68" /src && pip uninstall -y dicom-node \
    && python -c "import torch; print('torch', torch.__version__)"

FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/dicom-node \
       --create-home --shell /usr/sbin/nologin dicom-node
COPY --from=build /opt/dicom-node/.venv /opt/dicom-node/.venv
COPY config/models /opt/dicom-node/config/models
COPY config/node.yaml /etc/dicom-node/node.yaml
COPY pyproject.toml README.md /tmp/src/
COPY dicom_node /tmp/src/dicom_node
# the node itself, offline (its dependencies are in the venv); relative paths in node.yaml are
# taken from its folder: models/... are the shipped models
RUN /opt/dicom-node/.venv/bin/pip install --no-deps --no-build-isolation --no-index \
       --no-cache-dir --disable-pip-version-check -q /tmp/src \
    && rm -rf /tmp/src \
    && /opt/dicom-node/.venv/bin/python -c "import dicom_node.app.cli" \
    && ln -s /opt/dicom-node/config/models /etc/dicom-node/models \
    && chown dicom-node:dicom-node /var/lib/dicom-node
ENV PATH=/opt/dicom-node/.venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    DICOM_NODE_STORAGE_DIR=/var/lib/dicom-node DICOM_NODE_LOG_FORMAT=json

USER dicom-node
WORKDIR /var/lib/dicom-node
EXPOSE 11112
# storage: spool, database, audit log, outbox; config: node.yaml (and TLS files, keys)
VOLUME ["/var/lib/dicom-node", "/etc/dicom-node"]
# reads the config: C-ECHO to the node's own AE title and port (over TLS when tls is set);
# roles without a DICOM port check their database instead
HEALTHCHECK --interval=30s --timeout=15s --start-period=60s --retries=3 \
    CMD ["dicom-node", "health", "--config", "/etc/dicom-node/node.yaml"]
ENTRYPOINT ["dicom-node"]
CMD ["serve", "--config", "/etc/dicom-node/node.yaml"]
