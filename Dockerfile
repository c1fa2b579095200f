# SuperExec image for fedquant's Flower apps (Flower's docker-compose layout): the official
# flwr/superexec image at the pinned Flower version plus the fedquant library with the
# `flower` extra only (no Ray, no experiments' packages), so the ServerApp and ClientApp
# processes it launches can `import fedquant`; the FAB that `flwr run .` sends carries only
# the app modules (see [tool.flwr.app] in pyproject.toml). The SuperLink and SuperNodes use
# the official images unchanged. Compose files and their use: docs/deployment.md.
FROM flwr/superexec:1.41.0

WORKDIR /app
COPY constraints.txt pyproject.toml README.md ./
COPY fedquant ./fedquant
COPY clients ./clients
COPY server ./server
COPY simulations ./simulations
# The versions of constraints.txt (flwr is already installed at the same version); torch
# from its CPU index (2.13.0+cpu satisfies the pin torch==2.13.0).
# hadolint ignore=DL3013
RUN python -m pip install --no-cache-dir -c constraints.txt \
        --extra-index-url https://download.pytorch.org/whl/cpu ".[flower]" \
    && python -c "import fedquant.flower, fedquant.clients.flower_client" \
    && mkdir -p /app/results

ENTRYPOINT ["flower-superexec"]
