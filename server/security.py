"""Transport security and per-client bearer tokens.

* TLS: the server presents ``--tls-cert``/``--tls-key``; with ``--tls-client-ca`` it also
  requires every client to present a certificate signed by that CA (mutual TLS).
* Tokens: ``--tokens tokens.json`` maps client ids (decimal strings) and the special key
  ``"operator"`` to bearer tokens, sent as metadata ``authorization: Bearer <token>``.
  A missing or unknown token is UNAUTHENTICATED; a valid token used for another client id
  (or a client token used for an operator call) is PERMISSION_DENIED.

Without a tokens file, token checks are off (mutual TLS, if configured, still applies).

Example tokens file::

    {"operator": "s3cret-op", "1": "tok-client-1", "2": "tok-client-2"}
"""

from __future__ import annotations

import json
import pathlib

import grpc
from fedquant.server.rounds import MAX_CLIENT_ID, AggregationError

OPERATOR = "operator"


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


class Authenticator:
    """Checks the bearer token of a call against the tokens file (if any)."""

    __slots__ = ("_by_token",)

    def __init__(self, by_token: dict[str, str] | None = None):
        self._by_token = by_token

    @property
    def enabled(self) -> bool:
        return self._by_token is not None

    def principal(self, context: grpc.ServicerContext) -> str | None:
        """Who is calling ("operator" or a client id string); None when tokens are off."""
        if self._by_token is None:
            return None
        header = dict(context.invocation_metadata()).get("authorization", "")
        if not header.startswith("Bearer "):
            raise AggregationError("UNAUTHENTICATED",
                                   "missing 'authorization: Bearer <token>' metadata")
        principal = self._by_token.get(header[len("Bearer "):])
        if principal is None:
            raise AggregationError("UNAUTHENTICATED", "unknown bearer token")
        return principal

    def require_client(self, context: grpc.ServicerContext, client_id: int) -> None:
        principal = self.principal(context)
        if principal is not None and principal != str(client_id):
            raise AggregationError("PERMISSION_DENIED", f"the bearer token belongs to "
                                   f"{principal!r}, not to client {client_id}")

    def require_operator(self, context: grpc.ServicerContext) -> None:
        principal = self.principal(context)
        if principal is not None and principal != OPERATOR:
            raise AggregationError("PERMISSION_DENIED", f"client {principal} may not open or "
                                   "close rounds: this needs the operator token")


def server_credentials(cert: str | pathlib.Path, key: str | pathlib.Path,
                       client_ca: str | pathlib.Path | None = None) -> grpc.ServerCredentials:
    """TLS credentials; with `client_ca`, clients must present a certificate it signed."""
    pair = [(pathlib.Path(key).read_bytes(), pathlib.Path(cert).read_bytes())]
    if client_ca is None:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(pair, root_certificates=pathlib.Path(client_ca).read_bytes(),
                                       require_client_auth=True)
