# xds-server: the control plane alone (Envoy runs elsewhere, pointed at port 18000).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY xds_server ./xds_server
COPY snapshots ./snapshots
RUN pip install . && useradd --system --uid 10001 --home-dir /app xds
USER xds

# 18000: xDS + LRS (gRPC); 8080: admin API and /metrics (HTTP).
EXPOSE 18000 8080
ENTRYPOINT ["xds-server", "serve", "--host", "0.0.0.0", "--admin-host", "0.0.0.0"]
CMD ["--snapshot", "/app/snapshots/demo.yaml"]
