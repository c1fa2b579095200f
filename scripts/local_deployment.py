"""Run the fedquant Flower app on real Flower processes on 127.0.0.1, and write its compose files.

Two ways to run the app outside the in-process runner, both through ``flwr run``:

* ``deployment``: Flower's deployment runtime laid out as in Flower's docker-compose guide:
  one ``flower-superlink``, one ``flower-superexec`` for the ServerApp, N
  ``flower-supernode`` (each with its partition in ``--node-config``) and one
  ``flower-superexec`` per SuperNode for the ClientApps, all with ``--isolation process``;
  optionally with TLS (``--tls``: a CA, a server certificate) and Flower's SuperNode
  authentication (``--node-auth``: one EC key pair per SuperNode, registered with
  ``flwr supernode register`` before the SuperNodes start);
* ``simulation``: one ``flower-superlink --simulation`` (Flower's simulation engine, Ray)
  with ``num-supernodes`` virtual clients.

Every process gets an ephemeral port, ``FLWR_HOME`` inside the run directory, its log in
``<run>/logs/``, and is stopped, with every process it started, when the run ends.

:func:`service_commands` is the ONE definition of the flags: the local processes and the
compose files (``--write-compose``: ``docker-compose.yml``, the ``with-tls`` and
``with-auth`` overlays, ``docker-compose.server.yml``) are all built from it, and
tests/test_flower_compose.py checks the files against it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
FLWR_VERSION = "1.41.0"
FEDQUANT_VERSION = "0.1.0"
#: the SuperLink's one HTTP port (Fleet, Control and Runtime APIs) and the SuperNode's
#: Runtime API port: Flower 1.41's defaults of ``flower-superlink --port`` and
#: ``flower-supernode --port``
SUPERLINK_PORT, SUPERNODE_PORT = 8000, 9094
#: ``fedquant serve``'s default port
SERVER_PORT = 50051
#: where the compose files mount the credentials of scripts/generate_certs.py
CONTAINER_CERTS = "/app/certificates"
#: the files of scripts/generate_certs.py each service reads
CA, SERVER_CERT, SERVER_KEY = "ca.crt", "server.pem", "server.key"

#: gRPC health check of ``fedquant serve`` over TLS (the compose service's health check and
#: the test's): exit 0 when the aggregation service reports SERVING. Argument: CA path.
HEALTHCHECK = (
    "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; "
    "ca = open(sys.argv[2], 'rb').read(); "
    "ch = grpc.secure_channel(sys.argv[1], grpc.ssl_channel_credentials(ca)); "
    "r = g.HealthStub(ch).Check(h.HealthCheckRequest(), timeout=5); "
    "sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)")


# ---- the one definition of every service's command ------------------------------------
def superlink_args(host: str, port: int, *, simulation: bool = False,
                   certs: str | None = None, node_auth: bool = False) -> list[str]:
    """``flower-superlink``: plaintext, or TLS with the files of `certs` (a directory)."""
    if node_auth and certs is None:
        raise ValueError("SuperNode authentication needs TLS (Flower refuses it with "
                         "--insecure): pass certs")
    tls = (["--insecure"] if certs is None else
           ["--ssl-ca-certfile", f"{certs}/{CA}", "--ssl-certfile", f"{certs}/{SERVER_CERT}",
            "--ssl-keyfile", f"{certs}/{SERVER_KEY}"])
    args = ["flower-superlink", *tls, *(["--enable-supernode-auth"] if node_auth else []),
            "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    return args + (["--simulation"] if simulation else ["--isolation", "process"])


def superexec_args(runtime_api_address: str, *, root_cert: str | None = None) -> list[str]:
    """``flower-superexec``: plaintext to the Runtime API, or TLS verified with `root_cert`."""
    tls = ["--insecure"] if root_cert is None else ["--root-certificates", root_cert]
    return ["flower-superexec", *tls, "--runtime-api-address", runtime_api_address]


def supernode_args(superlink_address: str, partition_id: int, num_partitions: int,
                   host: str, port: int, *, certs: str | None = None,
                   auth_key: str | None = None) -> list[str]:
    """``flower-supernode`` with its partition; TLS to the SuperLink when `certs` is given,
    authenticated with the private key `auth_key` (OpenSSH EC key) when given."""
    if auth_key is not None and certs is None:
        raise ValueError("SuperNode authentication needs TLS: pass certs")
    tls = ["--insecure"] if certs is None else ["--root-certificates", f"{certs}/{CA}"]
    auth = [] if auth_key is None else ["--auth-supernode-private-key", auth_key]
    return ["flower-supernode", *tls, *auth, "--superlink", superlink_address,
            "--node-config", f"partition-id={partition_id} num-partitions={num_partitions}",
            "--isolation", "process", "--host", host, "--port", str(port)]


def supernode_key(certs: str, index: int) -> str:
    """Path of SuperNode `index`'s (1-based) private key in a credentials directory."""
    return f"{certs}/supernode-{index}"


def service_commands(num_supernodes: int, *, bind_host: str, superlink: tuple[str, int],
                     supernodes: list[tuple[str, int]], certs: str | None = None,
                     node_auth: bool = False) -> dict[str, list[str]]:
    """Every service of a deployment, named as in docker-compose.yml, with its argv.

    `superlink` is (address others use, port); `supernodes` the same for each SuperNode.
    `certs` (a directory of scripts/generate_certs.py's files) turns TLS on between the
    SuperLink and everyone else; `node_auth` adds Flower's SuperNode authentication. The
    SuperNodes' Runtime APIs stay plaintext: only their own SuperExec, on the same host
    (or compose network), talks to them.
    """
    if num_supernodes < 1 or len(supernodes) != num_supernodes:
        raise ValueError(f"need num_supernodes >= 1 and one address per SuperNode, got "
                         f"{num_supernodes} and {len(supernodes)}")
    link = f"{superlink[0]}:{superlink[1]}"
    root = None if certs is None else f"{certs}/{CA}"
    services = {"superlink": superlink_args(bind_host, superlink[1], certs=certs,
                                            node_auth=node_auth),
                "superexec-serverapp": superexec_args(link, root_cert=root)}
    for i, (node_host, node_port) in enumerate(supernodes):
        key = supernode_key(certs, i + 1) if node_auth and certs else None
        services[f"supernode-{i + 1}"] = supernode_args(
            link, i, num_supernodes, bind_host, node_port, certs=certs, auth_key=key)
        services[f"superexec-clientapp-{i + 1}"] = superexec_args(f"{node_host}:{node_port}")
    return services


def compose_commands(num_supernodes: int = 2, *, tls: bool = False,
                     node_auth: bool = False) -> dict[str, list[str]]:
    """The services as the compose files run them (service names as hosts)."""
    return service_commands(num_supernodes, bind_host="0.0.0.0",
                            superlink=("superlink", SUPERLINK_PORT),
                            supernodes=[(f"supernode-{i + 1}", SUPERNODE_PORT)
                                        for i in range(num_supernodes)],
                            certs=CONTAINER_CERTS if tls or node_auth else None,
                            node_auth=node_auth)


def server_commands(*, certs: str, data_dir: str, rounds_file: str, host: str, port: int,
                    target: str, num_clients: int = 2, round_id: str = "r1",
                    ) -> dict[str, list[str]]:
    """``fedquant serve`` (TLS, tokens, rounds opened at start-up) and its pushing clients."""
    services = {"fedquant-server": [
        "fedquant", "serve", "--host", host, "--port", str(port), "--data-dir", data_dir,
        "--tls-cert", f"{certs}/{SERVER_CERT}", "--tls-key", f"{certs}/{SERVER_KEY}",
        "--tokens", f"{certs}/tokens.json", "--rounds", rounds_file]}
    for i in range(1, num_clients + 1):
        services[f"fedquant-client-{i}"] = [
            "fedquant", "push", "--target", target, "--root-cert", f"{certs}/{CA}",
            "--token-file", f"{certs}/client-{i}.token", "--round", round_id,
            "--client-id", str(i), "--random", "--seed", str(i), "--wait-mean", "120"]
    return services


def rounds_toml(num_clients: int = 2, round_id: str = "r1") -> str:
    """The rounds file the server compose service opens at start-up."""
    return (f'[[round]]\nid = "{round_id}"\ncodec = "eden"\nparams = {{ bits = 2 }}\n'
            f"round_seed = 1\nshape = [4096]\nexpected = {num_clients}\n")


# ---- compose files ---------------------------------------------------------------------
_HEADER = ("# Generated by `python scripts/local_deployment.py --write-compose .`; do not edit:\n"
           "# tests/test_flower_compose.py checks it against that script and validates it.\n")


def _dump(doc: dict, usage: str) -> str:
    import yaml  # only to write the compose files (the dev extra); the runner needs psutil

    return _HEADER + usage + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False,
                                            width=100)


def _cert_mounts(*files: str) -> list[str]:
    return [f"${{FEDQUANT_CERTS:-./certificates}}/{f}:{CONTAINER_CERTS}/{f}:ro" for f in files]


def compose_doc(num_supernodes: int = 2) -> dict:
    """docker-compose.yml: Flower's compose layout, plaintext, SuperLink on loopback."""
    services: dict[str, dict] = {}
    superexec_build = {"context": ".", "dockerfile": "Dockerfile"}
    for name, argv in compose_commands(num_supernodes).items():
        svc: dict = {}
        if name == "superlink":
            svc["image"] = f"flwr/superlink:{FLWR_VERSION}"
        elif name.startswith("supernode"):
            svc["image"] = f"flwr/supernode:{FLWR_VERSION}"
        else:  # SuperExecs run the apps: flwr/superexec + fedquant[flower] (Dockerfile)
            svc["image"] = f"fedquant-superexec:{FEDQUANT_VERSION}"
            svc["build"] = dict(superexec_build)
        svc["entrypoint"] = [argv[0]]
        svc["command"] = argv[1:]
        if name == "superlink":
            # loopback unless SUPERLINK_BIND says otherwise (use TLS before exposing it)
            svc["ports"] = [f"${{SUPERLINK_BIND:-127.0.0.1}}:{SUPERLINK_PORT}:{SUPERLINK_PORT}"]
        elif name == "superexec-serverapp" or name.startswith("supernode"):
            svc["depends_on"] = ["superlink"]
        else:
            svc["depends_on"] = [name.replace("superexec-clientapp", "supernode")]
        if name == "superexec-serverapp":  # metrics (results/...) outlive the container
            svc["volumes"] = ["fedquant-results:/app/results"]
        if name.startswith("superexec") or name.startswith("supernode"):
            svc["restart"] = "on-failure"
        services[name] = svc
    return {"services": services, "volumes": {"fedquant-results": {}}}


def compose_overlay_doc(num_supernodes: int = 2, *, node_auth: bool = False) -> dict:
    """docker-compose.with-tls.yml (or with-auth): the commands with TLS (and SuperNode
    authentication), each service mounting read-only only the credentials it needs."""
    commands = compose_commands(num_supernodes, tls=True, node_auth=node_auth)
    services: dict[str, dict] = {}
    for name, argv in commands.items():
        if name.startswith("superexec-clientapp"):
            continue  # talks plaintext to its own SuperNode inside the compose network
        if name == "superlink":
            files = [CA, SERVER_CERT, SERVER_KEY]
        elif name.startswith("supernode"):
            files = [CA] + ([Path(supernode_key(".", int(name.rsplit("-", 1)[1]))).name]
                            if node_auth else [])
        else:
            files = [CA]
        services[name] = {"command": argv[1:], "volumes": _cert_mounts(*files)}
    return {"services": services}


def server_compose_doc(num_clients: int = 2) -> dict:
    """docker-compose.server.yml: ``fedquant serve`` behind TLS with tokens, its data on a
    volume, a gRPC health check; and `num_clients` clients pushing to it."""
    certs = CONTAINER_CERTS
    commands = server_commands(certs=certs, data_dir="/data", host="0.0.0.0",
                               port=SERVER_PORT, rounds_file="/app/rounds.toml",
                               target=f"fedquant-server:{SERVER_PORT}",
                               num_clients=num_clients)
    image = f"fedquant-server:{FEDQUANT_VERSION}"
    build = {"context": ".", "dockerfile": "docker/server.Dockerfile"}
    services: dict[str, dict] = {}
    for name, argv in commands.items():
        svc: dict = {"image": image, "build": dict(build), "entrypoint": [argv[0]],
                     "command": argv[1:]}
        if name == "fedquant-server":
            svc["volumes"] = ["fedquant-data:/data",
                              "./docker/rounds.toml:/app/rounds.toml:ro",
                              *_cert_mounts(CA, SERVER_CERT, SERVER_KEY, "tokens.json")]
            svc["ports"] = [f"${{FEDQUANT_BIND:-127.0.0.1}}:{SERVER_PORT}:{SERVER_PORT}"]
            svc["healthcheck"] = {
                "test": ["CMD", "python", "-c", HEALTHCHECK, f"localhost:{SERVER_PORT}",
                         f"{certs}/{CA}"],
                "interval": "10s", "timeout": "10s", "retries": 3, "start_period": "20s"}
            svc["restart"] = "unless-stopped"
        else:
            index = name.rsplit("-", 1)[1]
            svc["volumes"] = _cert_mounts(CA, f"client-{index}.token")
            svc["depends_on"] = {"fedquant-server": {"condition": "service_healthy"}}
        services[name] = svc
    return {"services": services, "volumes": {"fedquant-data": {}}}


def compose_files(num_supernodes: int = 2) -> dict[str, str]:
    """Every generated file: {path relative to the repository: text}."""
    usage = ("# docker compose up --build -d && flwr run . fedquant-compose --stream\n"
             "# (docs/deployment.md: the [superlink.fedquant-compose] entry of "
             "~/.flwr/config.toml)\n")
    tls_usage = ("# python scripts/generate_certs.py --out certificates\n"
                 "# docker compose -f docker-compose.yml -f docker-compose.with-tls.yml "
                 "up --build -d\n")
    auth_usage = ("# SuperNode authentication, on top of TLS (docs/deployment.md):\n"
                  "# docker compose -f docker-compose.yml -f docker-compose.with-tls.yml "
                  "-f docker-compose.with-auth.yml up --build -d\n")
    server_usage = ("# The aggregation server (fedquant serve) behind TLS, and clients pushing:\n"
                    "# python scripts/generate_certs.py --out certificates --tokens 2\n"
                    "# docker compose -f docker-compose.server.yml up --build\n")
    return {
        "docker-compose.yml": _dump(compose_doc(num_supernodes), usage),
        "docker-compose.with-tls.yml": _dump(compose_overlay_doc(num_supernodes), tls_usage),
        "docker-compose.with-auth.yml": _dump(
            compose_overlay_doc(num_supernodes, node_auth=True), auth_usage),
        "docker-compose.server.yml": _dump(server_compose_doc(2), server_usage),
        "docker/rounds.toml": "# opened by docker-compose.server.yml's fedquant-server\n"
                              + rounds_toml(2),
    }


def compose_yaml(num_supernodes: int = 2) -> str:
    """docker-compose.yml's text."""
    return compose_files(num_supernodes)["docker-compose.yml"]


# ---- running processes ----------------------------------------------------------------
def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _executable(name: str) -> str:
    local = Path(sys.executable).parent / name  # the venv's console script, if there
    return str(local) if local.exists() else name


def _env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ, FLWR_HOME=str(flwr_home), FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{log.stem} exited with code {proc.returncode}; see {log}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{log.stem} did not open port {port} within {timeout:.0f}s; see {log}")


def stop(procs: dict[str, subprocess.Popen], grace: float = 10.0) -> None:
    """Stop each process and everything it started (psutil's process tree), by PID.

    Flower's SuperExec and Ray start their own sessions, so besides each process we
    signal every descendant found before the first signal (which catches Ray actors
    orphaned when their parent exits). SIGTERM, then SIGKILL after `grace` seconds.
    """
    roots = []
    for proc in procs.values():
        if proc.poll() is None:
            try:
                roots.append(psutil.Process(proc.pid))
            except psutil.NoSuchProcess:
                pass
    _terminate_trees(roots, grace)
    for proc in procs.values():
        proc.wait()


def _terminate_trees(roots: list[psutil.Process], grace: float) -> None:
    """SIGTERM each process and every descendant found before the first signal, then
    SIGKILL whatever is still alive after `grace` seconds."""
    tree: list[psutil.Process] = []
    for parent in roots:
        try:
            tree += [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for p in tree:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)


#: what makes a plain ``flwr run .`` use this environment: the background SuperLink it
#: starts inherits the variable and then skips ``uv sync`` of the app's dependencies into a
#: new environment (Flower 1.41 installs them by default, e.g. a CUDA build of torch)
NO_DEPENDENCY_INSTALL = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def local_superlinks(port: str | None = None) -> list[psutil.Process]:
    """The background SuperLink(s) that a plain ``flwr run .`` started and left running:
    ``flower-superlink ... --simulation ... --port <port>`` (default:
    $FLWR_LOCAL_SUPERLINK_HTTP_API_PORT, else Flower 1.41's 39091)."""
    port = port or os.environ.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "39091")
    found = []
    for p in psutil.process_iter(["cmdline"]):
        argv = p.info["cmdline"] or []
        if (any(Path(a).name == "flower-superlink" for a in argv[:2]) and "--simulation" in argv
                and ("--port", port) in pairwise(argv)):
            found.append(p)
    return found


def stop_local_superlink(port: str | None = None, grace: float = 10.0) -> int:
    """Stop what :func:`local_superlinks` finds (and its children); returns how many
    SuperLinks it stopped."""
    links = local_superlinks(port)
    _terminate_trees(links, grace)
    return len(links)


def write_connection(flwr_home: Path, superlink: str, *, root_cert: Path | None = None,
                     name: str = "fedquant") -> Path:
    """``<flwr_home>/config.toml`` with one connection `name` (the default), TLS if
    `root_cert` is given; returns the path."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = ({"insecure": True} if root_cert is None else
                {"root-certificates": str(Path(root_cert).resolve())})
    doc = {"superlink": {"default": name, name: {"address": superlink, **security}}}
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in doc["superlink"][name].items()]
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def register_supernodes(run_dir: Path, certs: Path, count: int,
                        name: str = "fedquant") -> None:
    """``flwr supernode register`` each ``supernode-<i>.pub`` of `certs` with the SuperLink."""
    home = run_dir / "flwr_home"
    for i in range(1, count + 1):
        pub = Path(supernode_key(str(certs), i) + ".pub")
        with (run_dir / "logs" / "flwr_supernode_register.log").open("ab") as out:
            proc = subprocess.run([_executable("flwr"), "supernode", "register", str(pub), name],
                                  cwd=run_dir, env=_env(home), stdout=out,
                                  stderr=subprocess.STDOUT, timeout=120, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"flwr supernode register {pub} exited with "
                               f"{proc.returncode}; see {run_dir / 'logs'}")


@contextmanager
def flower_processes(run_dir: Path, *, num_supernodes: int = 2, simulation: bool = False,
                     certs: Path | None = None, node_auth: bool = False,
                     startup_timeout: float = 120.0) -> Iterator[tuple[str, dict]]:
    """Start a SuperLink (and for a deployment its SuperNodes and SuperExecs) on 127.0.0.1.

    `certs`: a directory of scripts/generate_certs.py's files (TLS); `node_auth`: SuperNode
    authentication with its ``supernode-<i>`` keys, registered before the SuperNodes start.
    Yields (superlink address, {service: Popen}); everything is stopped on exit.
    """
    run_dir = Path(run_dir).resolve()
    logs, home = run_dir / "logs", run_dir / "flwr_home"
    logs.mkdir(parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    link_port = free_port()
    certs_dir = None if certs is None else str(Path(certs).resolve())
    if simulation:
        commands = {"superlink": superlink_args("127.0.0.1", link_port, simulation=True,
                                                certs=certs_dir)}
    else:
        commands = service_commands(num_supernodes, bind_host="127.0.0.1",
                                    superlink=("127.0.0.1", link_port),
                                    supernodes=[("127.0.0.1", free_port())
                                                for _ in range(num_supernodes)],
                                    certs=certs_dir, node_auth=node_auth)
    link = f"127.0.0.1:{link_port}"
    write_connection(home, link, root_cert=None if certs is None else Path(certs) / CA)
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name, argv in commands.items():
            log = logs / f"{name}.log"
            with log.open("wb") as out:
                procs[name] = subprocess.Popen([_executable(argv[0]), *argv[1:]], cwd=run_dir,
                                               env=_env(home), stdout=out,
                                               stderr=subprocess.STDOUT, start_new_session=True)
            if name == "superlink":
                _wait_for_port(link_port, procs[name], startup_timeout, log)
                if node_auth:
                    register_supernodes(run_dir, Path(certs_dir), num_supernodes)
        yield link, procs
    finally:
        stop(procs)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))


def flwr_run(run_dir: Path, superlink: str, run_config: dict, *, num_supernodes: int = 2,
             simulation: bool = False, app_dir: Path = ROOT, timeout: float = 600.0,
             ) -> subprocess.CompletedProcess:
    """``flwr run <app_dir> fedquant --stream`` against the connection "fedquant" of
    ``<run>/flwr_home/config.toml`` (written by :func:`flower_processes`), waiting for the
    end; the run config overrides go in ``<run>/run_config.toml`` (``--run-config``)."""
    run_dir = Path(run_dir).resolve()
    home = run_dir / "flwr_home"
    if not (home / "config.toml").exists():
        write_connection(home, superlink)
    overrides = run_dir / "run_config.toml"
    overrides.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in run_config.items()))
    cmd = [_executable("flwr"), "run", str(app_dir), "fedquant", "--stream",
           "--run-config", str(overrides)]
    if simulation:
        cmd += ["--federation-config", f"num-supernodes={num_supernodes}"]
    with (run_dir / "logs" / "flwr_run.log").open("wb") as out:
        proc = subprocess.run(cmd, cwd=app_dir, env=_env(home), stdout=out,
                              stderr=subprocess.STDOUT, timeout=timeout, check=False)
    return proc


def read_metrics(path: Path) -> list[dict]:
    """The JSON lines the ServerApp wrote (one per round), [] if none yet."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_app(run_dir: Path, run_config: dict, *, num_supernodes: int = 2,
            simulation: bool = False, certs: Path | None = None, node_auth: bool = False,
            timeout: float = 600.0, started: dict | None = None) -> list[dict]:
    """Start the processes, ``flwr run`` the app, wait for every round, stop, return rows.

    `started`, if given, receives the SuperLink address ("superlink-address") and every
    started service's Popen, e.g. to check afterwards that all were stopped.
    """
    run_dir = Path(run_dir).resolve()
    metrics = run_dir / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    rounds = int(run_config.get("num-server-rounds", 3))
    config = {**run_config, "metrics-path": str(metrics), "min-nodes": num_supernodes}
    deadline = time.monotonic() + timeout
    with flower_processes(run_dir, num_supernodes=num_supernodes, simulation=simulation,
                          certs=certs, node_auth=node_auth) as (link, procs):
        if started is not None:
            started.update(procs, **{"superlink-address": link})
        proc = flwr_run(run_dir, link, config, num_supernodes=num_supernodes,
                        simulation=simulation, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"flwr run exited with {proc.returncode}; see "
                               f"{run_dir / 'logs' / 'flwr_run.log'}")
        lines = rounds + 1 + (int(run_config.get("final-ptq-bits", 0)) > 0)  # + final PTQ
        while len(read_metrics(metrics)) < lines:  # the stream may end before the file
            if time.monotonic() > deadline:
                raise TimeoutError(f"run did not finish {rounds} rounds in {timeout:.0f}s; "
                                   f"see {run_dir / 'logs'}")
            time.sleep(0.5)
    return read_metrics(metrics)


def run_local(run_dir: Path, run_config: dict, *, app_dir: Path = ROOT,
              timeout: float = 600.0) -> tuple[list[dict], str, str]:
    """The README's ``flwr run . --stream`` as a user runs it from a fresh clone: no
    connection configured (`flwr` writes its default "local" one), its background
    SuperLink on free ports, :data:`NO_DEPENDENCY_INSTALL` set. Returns the metric rows, the
    output of ``flwr run`` and the SuperLink's port; stops the background SuperLink."""
    run_dir = Path(run_dir).resolve()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    metrics = run_dir / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    overrides = run_dir / "run_config.toml"
    config = {**run_config, "metrics-path": str(metrics)}
    overrides.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in config.items()))
    port = str(free_port())
    env = dict(_env(run_dir / "flwr_home"), **NO_DEPENDENCY_INSTALL,
               FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=port,
               FLWR_LOCAL_CONTROL_API_PORT=str(free_port()))
    env.pop("PYTHONPATH", None)  # the installed package only, as after `pip install -e .`
    try:
        proc = subprocess.run([_executable("flwr"), "run", ".", "--stream", "--run-config",
                               str(overrides)], cwd=app_dir, env=env, capture_output=True,
                              text=True, timeout=timeout, check=False)
        (run_dir / "logs" / "flwr_run.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"flwr run exited with {proc.returncode}; see {run_dir}/logs")
        rounds = int(run_config.get("num-server-rounds", 3))
        lines = rounds + 1 + (int(run_config.get("final-ptq-bits", 0)) > 0)
        deadline = time.monotonic() + timeout
        while len(read_metrics(metrics)) < lines:
            if time.monotonic() > deadline:
                raise TimeoutError(f"run did not finish {rounds} rounds in {timeout:.0f}s")
            time.sleep(0.5)
    finally:
        stop_local_superlink(port)
    return read_metrics(metrics), proc.stdout, port


def write_compose_files(directory: Path, num_supernodes: int = 2) -> list[Path]:
    """Write every file of :func:`compose_files` under `directory`; returns the paths."""
    written = []
    for rel, text in compose_files(num_supernodes).items():
        path = Path(directory) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Run the fedquant Flower app on local Flower processes (SuperLink, "
                    "SuperNodes, SuperExecs on 127.0.0.1, ephemeral ports), print one JSON "
                    "line per round; or write the compose files (--write-compose).",
        epilog="Examples: %(prog)s --supernodes 2 --rounds 2 | "
               "%(prog)s --tls --node-auth | %(prog)s --write-compose .",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--supernodes", type=int, default=2,
                        help="SuperNodes (clients), each with its own data partition")
    parser.add_argument("--rounds", type=int, default=2, help="federated rounds")
    parser.add_argument("--codec", default="eden:bits=2",
                        help="codec spec, name:key=value,... (fedquant.get_codec)")
    parser.add_argument("--simulation", action="store_true",
                        help="Flower's simulation engine (Ray) instead of SuperNode processes")
    parser.add_argument("--tls", action="store_true",
                        help="TLS between SuperLink, SuperNodes, SuperExecs and flwr, with "
                             "credentials generated into <out>/certificates")
    parser.add_argument("--node-auth", action="store_true",
                        help="Flower's SuperNode authentication (implies --tls): one key "
                             "pair per SuperNode, registered with `flwr supernode register`")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "local_deployment",
                        help="run directory: logs/, flwr_home/, metrics.jsonl")
    parser.add_argument("--write-compose", type=Path, metavar="DIR",
                        help="write docker-compose.yml, its with-tls/with-auth overlays, "
                             "docker-compose.server.yml and docker/rounds.toml under DIR "
                             "for --supernodes, then exit")
    parser.add_argument("--stop-local-superlink", action="store_true",
                        help="stop the background SuperLink a plain `flwr run .` started "
                             "(127.0.0.1:39091, or $FLWR_LOCAL_SUPERLINK_HTTP_API_PORT), "
                             "then exit")
    args = parser.parse_args(argv)
    if args.stop_local_superlink:
        print(f"stopped {stop_local_superlink()} local SuperLink(s)")
        return
    if args.supernodes < 1 or args.rounds < 1:
        parser.error("--supernodes and --rounds must be at least 1")
    if args.write_compose:
        for path in write_compose_files(args.write_compose, args.supernodes):
            print(path)
        return
    certs = None
    if args.tls or args.node_auth:
        if str(Path(__file__).resolve().parent) not in sys.path:  # imported, not run
            sys.path.insert(0, str(Path(__file__).resolve().parent))
        import generate_certs  # the sibling script
        certs = args.out.resolve() / "certificates"
        generate_certs.generate(certs, supernodes=args.supernodes if args.node_auth else 0)
    rows = run_app(args.out, {"num-server-rounds": args.rounds, "codec": args.codec},
                   num_supernodes=args.supernodes, simulation=args.simulation, certs=certs,
                   node_auth=args.node_auth)
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
