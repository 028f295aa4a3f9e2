"""The broker's Redis: the URL forms ``MODELYARD_BROKER_URL`` takes and the one way to open a client on it.

Every plain Redis client of the broker (the job store, leases, queue counts, test plugins) comes
from ``redis_client``; the Celery app's connection settings come from ``celery_connection``. So a
URL means the same thing to the workers, the producer, Flower and the job store.

The forms:

``redis://[[user]:password@]host[:port][/db]``
    One Redis. ``rediss://`` is the same over TLS (the certificate is verified unless the URL says
    ``ssl_cert_reqs=none``); ``redis+socket:///path/redis.sock?virtual_host=0`` a Unix socket.

``sentinel://[[user]:password@]host:port;sentinel://host:port;...[/db]?master_name=NAME[&option...]``
    Redis Sentinel: the sentinels to ask, separated by ``;`` (port 26379 when left out), and the name
    of the master they watch. Clients connect to whichever Redis the sentinels say is the master now,
    and find the new one after a failover. The credentials and the database (default 0) are the
    master's; give them once, on any part (conventionally the first), or identically on several. The
    query (conventionally on the last part) takes:

    - ``master_name`` (required): the name in the sentinels' ``sentinel monitor NAME ...`` line;
    - ``sentinel_password``: the sentinels' own ``requirepass``, when they have one (it may differ
      from the master's password); ``sentinel_username`` with it for an ACL user;
    - ``ssl=true``: TLS to the sentinels and to the master and replicas, with ``ssl_cert_reqs``
      (``required`` by default, ``optional``, ``none``), ``ssl_ca_certs``, ``ssl_certfile`` and
      ``ssl_keyfile`` as for ``rediss://``.

    Example: ``sentinel://:s3cret@10.0.0.1:26379;sentinel://10.0.0.2:26379;sentinel://10.0.0.3:26379/0?master_name=modelyard``.

    Celery and kombu take a sentinel broker as ``sentinel://...;sentinel://...`` with the master name
    (and ``sentinel_kwargs``) in ``broker_transport_options`` / ``result_backend_transport_options``
    and TLS in ``broker_use_ssl`` / ``redis_backend_use_ssl``; ``celery_connection`` translates. It
    repeats the credentials and database on every part, because kombu re-reads the connection
    settings from the next part when it fails over to it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import redis
from redis.sentinel import Sentinel

from shared.errors import UserInputError

SENTINEL_SCHEME = "sentinel://"
SENTINEL_PORT = 26379
SSL_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
CERT_REQS = ("required", "optional", "none")
SENTINEL_OPTIONS = ("master_name", "sentinel_password", "sentinel_username", "ssl", "ssl_cert_reqs", *SSL_FILES)
# How a client asks a sentinel "who is the master of NAME?": briefly, and once. A sentinel that does
# not answer is skipped for the next one; redis-py's default retries (3, backoff up to 10 s) would stall
# every discovery for seconds per dead sentinel listed before a live one.
SENTINEL_CONNECTION = {"socket_timeout": 2.0, "socket_connect_timeout": 2.0, "retry": None}


@dataclass(frozen=True)
class SentinelURL:
    """A parsed ``sentinel://`` broker URL."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int = 0
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    ssl: dict[str, str] | None = None  # redis-py's ssl_* arguments; None: plain TCP

    def master_kwargs(self) -> dict[str, Any]:
        """Connection arguments of the master (and replicas) as redis-py takes them."""
        kwargs: dict[str, Any] = {"db": self.db}
        if self.username:
            kwargs["username"] = self.username
        if self.password:
            kwargs["password"] = self.password
        if self.ssl is not None:
            kwargs.update(ssl=True, **self.ssl)
        return kwargs

    def sentinel_kwargs(self) -> dict[str, Any]:
        """Connection arguments of the sentinels themselves (redis-py's and kombu's ``sentinel_kwargs``)."""
        kwargs: dict[str, Any] = dict(SENTINEL_CONNECTION)
        if self.sentinel_username:
            kwargs["username"] = self.sentinel_username
        if self.sentinel_password:
            kwargs["password"] = self.sentinel_password
        if self.ssl is not None:
            kwargs.update(ssl=True, **self.ssl)
        return kwargs

    def celery_url(self) -> str:
        """The URL Celery and kombu take: every part carries the credentials and the database."""
        auth = ""
        if self.username or self.password:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password or '', safe='')}@"
        return ";".join(f"sentinel://{auth}{_host(host)}:{port}/{self.db}" for host, port in self.sentinels)

    def client(self, **options: Any) -> redis.Redis:
        """A client of the current master: it asks the sentinels again whenever it (re)connects."""
        sentinel = Sentinel(list(self.sentinels), sentinel_kwargs=self.sentinel_kwargs(),
                            **{**self.master_kwargs(), **options})
        return sentinel.master_for(self.master_name)


def is_sentinel(url: str) -> bool:
    return url.startswith(SENTINEL_SCHEME)


def parse_sentinel(url: str) -> SentinelURL:
    """Parse a ``sentinel://`` broker URL; UserInputError that names what is wrong."""
    if not is_sentinel(url):
        raise UserInputError(f"MODELYARD_BROKER_URL {redact(url)}: not a sentinel:// URL")
    found: dict[str, set[str]] = {"username": set(), "password": set(), "db": set()}
    options: dict[str, str] = {}
    sentinels: list[tuple[str, int]] = []
    for part in url.split(";"):
        part = part.strip()
        if not part:
            continue
        if not is_sentinel(part):
            raise UserInputError(f"MODELYARD_BROKER_URL {redact(url)}: every ';'-separated part must start "
                                 f"with sentinel://, not {redact(part)!r}")
        pieces = urlsplit("http://" + part[len(SENTINEL_SCHEME):])
        try:
            host, port = pieces.hostname, pieces.port or SENTINEL_PORT
        except ValueError as exc:  # a port that is not a number
            raise UserInputError(f"MODELYARD_BROKER_URL {redact(url)}: {exc}") from None
        if not host:
            raise UserInputError(f"MODELYARD_BROKER_URL {redact(url)}: a sentinel without a host in "
                                 f"{redact(part)!r}")
        sentinels.append((unquote(host), port))
        if pieces.username:
            found["username"].add(unquote(pieces.username))
        if pieces.password:
            found["password"].add(unquote(pieces.password))
        if pieces.path.strip("/"):
            found["db"].add(pieces.path.strip("/"))
        for key, value in parse_qsl(pieces.query, keep_blank_values=True):
            if key not in SENTINEL_OPTIONS:
                raise UserInputError(f"MODELYARD_BROKER_URL {redact(url)}: unknown option {key!r} "
                                     f"(known: {', '.join(SENTINEL_OPTIONS)})")
            if key in options and options[key] != value:
                raise UserInputError(f"MODELYARD_BROKER_URL {redact(url)}: option {key!r} is given twice, "
                                     "differently")
            options[key] = value
    for name, values in found.items():
        if len(values) > 1:
            raise UserInputError(f"MODELYARD_BROKER_URL {redact(url)}: the parts give different {name}s; give "
                                 "the master's once, or the same on every part")
    if not sentinels:
        raise UserInputError(f"MODELYARD_BROKER_URL {redact(url)}: no sentinel host")
    master_name = options.get("master_name", "").strip()
    if not master_name:
        raise UserInputError(
            f"MODELYARD_BROKER_URL {redact(url)}: a sentinel URL needs the name of the master the sentinels "
            "watch, e.g. sentinel://:password@host1:26379;sentinel://host2:26379/0?master_name=mymaster"
        )
    db_text = next(iter(found["db"]), "0")
    if not db_text.isdigit():
        raise UserInputError(f"MODELYARD_BROKER_URL {redact(url)}: the database must be a number, not {db_text!r}")
    return SentinelURL(
        sentinels=tuple(sentinels),
        master_name=master_name,
        username=next(iter(found["username"]), None),
        password=next(iter(found["password"]), None),
        db=int(db_text),
        sentinel_username=options.get("sentinel_username") or None,
        sentinel_password=options.get("sentinel_password") or None,
        ssl=_ssl_options(url, options),
    )


def _ssl_options(url: str, options: dict[str, str]) -> dict[str, str] | None:
    flag = options.get("ssl", "false").lower()
    if flag not in ("true", "false", "1", "0", "yes", "no"):
        raise UserInputError(f"MODELYARD_BROKER_URL {redact(url)}: ssl must be true or false, not {flag!r}")
    wants_tls = flag in ("true", "1", "yes")
    given = [key for key in ("ssl_cert_reqs", *SSL_FILES) if options.get(key)]
    if not wants_tls:
        if given:
            raise UserInputError(f"MODELYARD_BROKER_URL {redact(url)}: {', '.join(given)} without ssl=true")
        return None
    cert_reqs = options.get("ssl_cert_reqs", "required").lower()
    if cert_reqs not in CERT_REQS:
        raise UserInputError(f"MODELYARD_BROKER_URL {redact(url)}: ssl_cert_reqs must be one of "
                             f"{', '.join(CERT_REQS)}, not {cert_reqs!r}")
    return {"ssl_cert_reqs": cert_reqs, **{key: options[key] for key in SSL_FILES if options.get(key)}}


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def redis_client(url: str, **options: Any) -> redis.Redis:
    """A client of the broker's Redis, of its current master for a sentinel URL; options go to redis-py."""
    if is_sentinel(url):
        return parse_sentinel(url).client(**options)
    if url.startswith("redis+socket://"):  # kombu's socket form; redis-py calls it unix:// and the db 'db'
        url = "unix://" + url[len("redis+socket://"):].replace("virtual_host=", "db=")
    return redis.Redis.from_url(with_tls_defaults(url), **options)


@dataclass(frozen=True)
class CeleryConnection:
    """What a Celery app needs to reach the broker and the result backend for one broker URL."""

    url: str
    transport_options: dict[str, Any]  # merged into broker_ and result_backend_transport_options
    settings: dict[str, Any]  # further Celery settings (TLS)


def celery_connection(url: str) -> CeleryConnection:
    if not is_sentinel(url):
        return CeleryConnection(url=with_tls_defaults(url), transport_options={}, settings={})
    parsed = parse_sentinel(url)
    options = {"master_name": parsed.master_name, "sentinel_kwargs": parsed.sentinel_kwargs()}
    tls = {"broker_use_ssl": dict(parsed.ssl), "redis_backend_use_ssl": dict(parsed.ssl)} if parsed.ssl else {}
    return CeleryConnection(url=parsed.celery_url(), transport_options=options, settings=tls)


def with_tls_defaults(url: str) -> str:
    """A ``rediss://`` URL that does not say otherwise verifies the server's certificate.

    Celery's Redis result backend refuses a ``rediss://`` URL without ``ssl_cert_reqs``, and kombu
    would connect without verifying; ``ssl_cert_reqs=required`` is what redis-py does by default.
    """
    if url.startswith("rediss://") and "ssl_cert_reqs=" not in url:
        url += ("&" if "?" in url else "?") + "ssl_cert_reqs=required"
    return url


_SECRET_QUERY = re.compile(r"((?:sentinel_)?password=)[^&;]*", re.IGNORECASE)


def redact(url: str) -> str:
    """The URL with every password replaced by ``***``: fit for messages and logs."""
    parts = []
    for part in url.split(";"):
        address = part.split("?", 1)[0]
        if "://" in address and "@" in address:
            scheme = part.split("://", 1)[0]
            part = f"{scheme}://***@{part[len(address.rsplit('@', 1)[0]) + 1:]}"
        parts.append(_SECRET_QUERY.sub(r"\1***", part))
    return ";".join(parts)
