"""Transport security, bearer tokens and who may call what.

* TLS: the server presents ``--tls-cert``/``--tls-key``; with ``--tls-client-ca`` it also
  requires every client to present a certificate signed by that CA (mutual TLS).
  ``--insecure`` (plaintext) is refused unless the server binds a loopback address.
* Client tokens: ``--tokens tokens.json`` maps client ids (decimal strings) to bearer tokens,
  sent as metadata ``authorization: Bearer <token>``. A missing or unknown token is
  UNAUTHENTICATED; a valid token used for another client id is PERMISSION_DENIED. Without a
  tokens file, clients are anonymous: anyone who reaches the server may push as any id.
* Admin credential: ``OpenRound`` and ``CloseRound`` always need the admin token: the
  tokens file's ``"operator"`` entry, else ``--admin-token-file``, else a random token the
  server writes to ``<data-dir>/admin.token`` (mode 0600) at start-up.
* Reads: an admin sees everything; a client sees a round's configuration (it needs it to
  encode) and only its own push, and reads the mean only of a round whose cohort holds it
  or, for a round without a cohort, to which it pushed. Anonymous callers (no tokens file)
  see the configuration and, like anyone who can reach the server, the mean.
* Tokens are never compared as secrets: a presented token is hashed (SHA-256) and its
  digest looked up, so the time a lookup takes says nothing usable about a valid token.

Example tokens file::

    {"operator": "s3cret-op", "1": "tok-client-1", "2": "tok-client-2"}
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import secrets

import grpc

from fedquant.server.rounds import MAX_CLIENT_ID, AggregationError

OPERATOR = "operator"
ADMIN_TOKEN_FILE = "admin.token"


def load_tokens(path: str | pathlib.Path) -> dict[str, str]:
    """Read a tokens file; returns token -> principal ("operator" or a client id string)."""
    try:
        data = json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"tokens file {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"tokens file {path}: expected a JSON object of id -> token")
    by_token: dict[str, str] = {}
    for principal, token in data.items():
        if principal != OPERATOR and not (principal.isdigit()
                                          and int(principal) <= MAX_CLIENT_ID):
            raise ValueError(f"tokens file {path}: key {principal!r} must be 'operator' or "
                             "a decimal client id in [0, 2^64)")
        if not isinstance(token, str) or len(token) < 8:
            raise ValueError(f"tokens file {path}: token of {principal!r} must be a string "
                             "of at least 8 characters")
        if token in by_token:
            raise ValueError(f"tokens file {path}: {principal!r} and {by_token[token]!r} "
                             "share a token")
        by_token[token] = principal if principal == OPERATOR else str(int(principal))
    return by_token


def admin_token(data_dir: str | pathlib.Path, path: str | pathlib.Path | None = None) -> str:
    """The admin token from `path`, or else the one in ``<data_dir>/admin.token`` (created
    with a random token, mode 0600, if missing). ValueError names a bad file."""
    file = pathlib.Path(path) if path else pathlib.Path(data_dir) / ADMIN_TOKEN_FILE
    if path is None and not file.exists():
        file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    try:
        token = file.read_text().strip()
    except OSError as e:
        raise ValueError(f"admin token file {file}: {e.strerror}") from None
    if len(token) < 16:
        raise ValueError(f"admin token file {file}: the token must be at least 16 characters")
    return token


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class Authenticator:
    """Checks the bearer token of a call: client tokens (if a tokens file is given) and the
    admin token (always)."""

    __slots__ = ("_by_digest", "_clients_anonymous")

    def __init__(self, by_token: dict[str, str] | None = None, admin: str | None = None):
        """`by_token`: token -> principal from :func:`load_tokens` (None: anonymous
        clients); `admin`: the admin token, replacing any "operator" entry of `by_token`."""
        tokens = dict(by_token or {})
        if admin is not None:
            tokens = {t: p for t, p in tokens.items() if p != OPERATOR}
            tokens[admin] = OPERATOR
        self._by_digest = {_digest(t): p for t, p in tokens.items()}
        self._clients_anonymous = by_token is None

    @property
    def enabled(self) -> bool:
        """Whether clients must present tokens."""
        return not self._clients_anonymous

    def principal(self, context: grpc.ServicerContext) -> str | None:
        """Who is calling: "operator", a client id string, or None (an anonymous client,
        only when there is no tokens file)."""
        header = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                header = value
        if not header:
            if self._clients_anonymous:
                return None
            raise AggregationError("UNAUTHENTICATED",
                                   "missing 'authorization: Bearer <token>' metadata")
        if not isinstance(header, str) or not header.startswith("Bearer "):
            raise AggregationError("UNAUTHENTICATED", "the authorization metadata must be "
                                   "'Bearer <token>'")
        # Tokens are looked up by their SHA-256 digest, so no comparison ever runs over the
        # secret itself (a digest's matching prefix says nothing usable about a token).
        principal = self._by_digest.get(_digest(header[len("Bearer "):]))
        if principal is None:
            raise AggregationError("UNAUTHENTICATED", "unknown bearer token")
        return principal

    def require_client(self, context: grpc.ServicerContext, client_id: int) -> str | None:
        principal = self.principal(context)
        if principal is None or self._clients_anonymous:
            return principal
        if principal != str(client_id):
            raise AggregationError("PERMISSION_DENIED", f"the bearer token belongs to "
                                   f"{principal!r}, not to client {client_id}")
        return principal

    def require_operator(self, context: grpc.ServicerContext) -> None:
        principal = self.principal(context)
        if principal != OPERATOR:
            who = "an anonymous caller" if principal is None else f"client {principal}"
            raise AggregationError("PERMISSION_DENIED", f"{who} may not open or close "
                                   "rounds: this needs the admin (operator) token")

    @staticmethod
    def is_admin(principal: str | None) -> bool:
        return principal == OPERATOR


def server_credentials(cert: str | pathlib.Path, key: str | pathlib.Path,
                       client_ca: str | pathlib.Path | None = None) -> grpc.ServerCredentials:
    """TLS credentials; with `client_ca`, clients must present a certificate it signed."""
    pair = [(pathlib.Path(key).read_bytes(), pathlib.Path(cert).read_bytes())]
    if client_ca is None:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(pair, root_certificates=pathlib.Path(client_ca).read_bytes(),
                                       require_client_auth=True)
