# SuperExec image for fedquant's Flower apps (Flower's docker-compose layout): the official
# flwr/superexec image at the pinned Flower version plus the fedquant library, so the
# ServerApp and ClientApp processes it launches can `import fedquant` (the FAB that
# `flwr run .` sends carries only the app modules; see [tool.flwr.app] in pyproject.toml).
#
#   docker compose up --build -d      # superlink, superexecs, supernodes (docker-compose.yml)
#   flwr run . fedquant-compose --stream
#
# with, in $FLWR_HOME/config.toml:
#   [superlink.fedquant-compose]
#   address = "127.0.0.1:9093"
#   insecure = true
FROM flwr/superexec:1.41.0

WORKDIR /app
COPY pyproject.toml README.md ./
COPY fedquant ./fedquant
COPY clients ./clients
COPY server ./server
COPY simulations ./simulations
# CPU wheels of torch; every version is pinned in pyproject.toml (flwr is already installed).
RUN python -m pip install --no-cache-dir \
        --extra-index-url https://download.pytorch.org/whl/cpu . \
    && python -c "import fedquant, simulations.fl_task"

ENTRYPOINT ["flower-superexec"]
