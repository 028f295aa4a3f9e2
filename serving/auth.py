"""An optional bearer token for ``modelyard serve``.

The token comes from ``--token-file`` (the file's content, stripped; a Kubernetes Secret mounted
as a file) or the ``MODELYARD_SERVE_TOKEN`` environment variable; with neither, the server is
open. With one, every route but the health routes (``/v2/health/live``, ``/v2/health/ready``,
which load balancers and kubelets probe without credentials) answers 401 to a request without
``Authorization: Bearer <token>``. ``/metrics`` is protected too: give Prometheus the token
(``authorization: {credentials_file: ...}`` in its scrape config). Tokens are compared in
constant time and never logged.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from pathlib import Path

from serving.errors import RequestError
from shared.errors import UserInputError

TOKEN_ENV = "MODELYARD_SERVE_TOKEN"
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="modelyard"'}


def load_token(token_file: Path | str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The token to require, or None for an open server. UserInputError for an unreadable or empty file."""
    if token_file is not None:
        path = Path(token_file)
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise UserInputError(f"--token-file {path}: cannot read it ({exc.strerror or exc})") from None
        if not token:
            raise UserInputError(f"--token-file {path} is empty")
        return token
    environ = os.environ if environ is None else environ
    return environ.get(TOKEN_ENV, "").strip() or None


def check_bearer(authorization: str | None, token: str | None) -> None:
    """Pass when no token is required or the header carries it; else RequestError 401."""
    if token is None:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise RequestError("this server needs a bearer token: send 'Authorization: Bearer <token>'", 401,
                           headers=CHALLENGE)
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise RequestError("the bearer token is not valid", 401, headers=CHALLENGE)
