# circuit-proxy: a slim, non-root image of the sidecar.
#
#   docker build -t circuit-proxy .
#   docker run -p 8080:8080 -v "$PWD/config:/etc/circuit-proxy/config:ro" circuit-proxy
#
# The config is read from /etc/circuit-proxy/config/breakers.yaml (mount your own folder or a
# Kubernetes ConfigMap there); the shipped one is baked in as a default. Fallback response
# files are read from /etc/circuit-proxy/fallback_responses (the config's folder's sibling).
# SQLite, when used, lives under /var/lib/circuit-proxy/var (a volume for a single replica);
# a fleet uses PostgreSQL instead: see docs/scale-out.md.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY fake_upstreams ./fake_upstreams
RUN python -m venv /opt/circuit-proxy \
    && /opt/circuit-proxy/bin/pip install --no-compile . \
    && /opt/circuit-proxy/bin/circuit-proxy --help >/dev/null

FROM python:3.11-slim
RUN useradd --system --no-log-init --uid 10001 --user-group \
        --home-dir /var/lib/circuit-proxy --create-home circuit-proxy
COPY --from=build /opt/circuit-proxy /opt/circuit-proxy
COPY fallback_responses /etc/circuit-proxy/fallback_responses
COPY config/breakers.yaml /etc/circuit-proxy/config/breakers.yaml
ENV PATH=/opt/circuit-proxy/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /var/lib/circuit-proxy
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]
CMD ["circuit-proxy", "run", "--config", "/etc/circuit-proxy/config/breakers.yaml", "--host", "0.0.0.0", "--port", "8080"]
