# xds-server: the control plane alone (Envoy runs elsewhere, pointed at port 18000).
# The image holds only what the wheel holds: stage 1 builds the wheel from the source, stage 2
# installs it and nothing else. tests/test_packaging.py builds and runs the wheel the same way
# (this file's build-stage COPY inputs, its ENTRYPOINT + CMD and its HEALTHCHECK).
#   docker build -t xds-server .
#   docker run --rm -p 18000:18000 -p 8080:8080 -p 18001:18001 xds-server

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# snapshots/ too: xds_server/data/demo.yaml (the embedded demo) links to snapshots/demo.yaml.
COPY pyproject.toml README.md ./
COPY snapshots/ ./snapshots/
COPY xds_server/ ./xds_server/
COPY lrs/ ./lrs/
COPY xds_lab/ ./xds_lab/
RUN pip wheel --no-deps --wheel-dir /dist .

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
COPY --from=build /dist/ /tmp/dist/
RUN pip install /tmp/dist/xds_server-*.whl \
    && rm -rf /tmp/dist \
    && groupadd --system --gid 10001 xds \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin xds
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001

# 18000: xDS + LRS (gRPC); 8080: admin API, /healthz, /metrics (HTTP); 18001: body router
# (ext_proc, gRPC).
EXPOSE 18000 8080 18001
# Liveness of the admin API on its default port (no curl in slim images: Python's urllib).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
ENTRYPOINT ["xds-server"]
# Without --snapshot: the demo snapshot embedded in the wheel. Mount a file and pass
# `serve --snapshot /config/snapshot.yaml --host 0.0.0.0 --admin-host 0.0.0.0` to serve yours.
CMD ["serve", "--host", "0.0.0.0", "--admin-host", "0.0.0.0"]
