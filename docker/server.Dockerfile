# The aggregation server (`fedquant serve`) and its push client (`fedquant push`): fedquant
# with the `server` extra only (grpcio, health checking, cryptography; no Flower, no Ray).
# Built by docker-compose.server.yml (docs/deployment.md).
FROM python:3.11-slim

WORKDIR /app
COPY constraints.txt pyproject.toml README.md ./
COPY fedquant ./fedquant
COPY clients ./clients
COPY server ./server
COPY simulations ./simulations
# The versions of constraints.txt; torch from its CPU index (2.13.0+cpu satisfies the pin).
# Non-root user 49999, as in Flower's images, so one `chown 49999` serves both.
# hadolint ignore=DL3013
RUN python -m pip install --no-cache-dir -c constraints.txt \
        --extra-index-url https://download.pytorch.org/whl/cpu ".[server]" \
    && python -c "import fedquant.server.cli" \
    && useradd --uid 49999 --no-create-home --shell /usr/sbin/nologin app \
    && mkdir -p /data && chown app /data

USER 49999
EXPOSE 50051
ENTRYPOINT ["fedquant"]
CMD ["serve", "--help"]
