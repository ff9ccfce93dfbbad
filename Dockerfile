# dicom-node container: CPU build by default.
#   docker build -t dicom-node .
#   docker run -p 11112:11112 -v dicom-node-data:/var/lib/dicom-node \
#       -v $PWD/config/node.yaml:/etc/dicom-node/node.yaml:ro dicom-node
# For a GPU host, build with --build-arg TORCH_SPEC="torch==2.13.0 --index-url <CUDA wheel index>"
# and run with --gpus all (docs/deployment.md). Relative paths in node.yaml are taken from its
# folder: /etc/dicom-node/models links to the shipped models; storage_dir comes from the env.
FROM python:3.11-slim-bookworm

ARG TORCH_SPEC="torch==2.13.0"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    DICOM_NODE_STORAGE_DIR=/var/lib/dicom-node DICOM_NODE_LOG_FORMAT=json

RUN useradd --system --home-dir /var/lib/dicom-node --create-home dicom-node
WORKDIR /opt/dicom-node
COPY pyproject.toml README.md ./
COPY dicom_node ./dicom_node
COPY config ./config
RUN python -m venv .venv \
    && .venv/bin/pip install --no-cache-dir $TORCH_SPEC \
    && .venv/bin/pip install --no-cache-dir . \
    && mkdir -p /etc/dicom-node && cp config/node.yaml /etc/dicom-node/node.yaml \
    && ln -s /opt/dicom-node/config/models /etc/dicom-node/models

USER dicom-node
EXPOSE 11112
VOLUME ["/var/lib/dicom-node"]
HEALTHCHECK --interval=30s --timeout=10s CMD ["/opt/dicom-node/.venv/bin/dicom-node", "echo", "127.0.0.1", "11112", "--ae-title", "DICOMNODE"]
ENTRYPOINT ["/opt/dicom-node/.venv/bin/dicom-node"]
CMD ["serve", "--config", "/etc/dicom-node/node.yaml"]
