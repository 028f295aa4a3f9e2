"""What the broker's Redis holds for each queue: waiting messages and reserved (unacked) ones.

Both the producer (``modelyard queues``) and the worker's metrics endpoint count queues, so the
counting lives here, over a plain Redis client (``shared.broker.redis_client``), rather than in either of them.

Queue depth follows kombu's Redis transport (5.x): a message for queue ``cpu`` is LPUSHed to the
list ``cpu`` when its priority maps to the first priority step, else to ``cpu`` + sep + step
(sep ``"\\x06\\x16"``, steps ``[0, 3, 6, 9]``: ``cpu\\x06\\x163``, ``cpu\\x06\\x166``,
``cpu\\x06\\x169``). Messages a worker has reserved but not acknowledged (``acks_late``: every
running stage) live in the hash ``unacked`` as ``[raw message, exchange, routing key]``; they are
not in the list any more. ``global_keyprefix`` (a transport option) prefixes every key.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import redis

from shared.celery_app import QUEUES

# kombu.transport.redis.Channel defaults (kombu 5.x); overridable through broker_transport_options.
KOMBU_SEP = "\x06\x16"
KOMBU_PRIORITY_STEPS = (0, 3, 6, 9)
KOMBU_UNACKED_KEY = "unacked"


def queue_keys(queue: str, transport_options: dict | None = None) -> list[str]:
    """The Redis lists that hold queue's waiting messages, one per priority step, as kombu names them."""
    options = transport_options or {}
    sep = options.get("sep", KOMBU_SEP)
    steps = sorted(set(options.get("priority_steps", KOMBU_PRIORITY_STEPS)))
    prefix = options.get("global_keyprefix", "") or ""
    keys = []
    for step in steps:
        # kombu's _q_for_pri: the step that priority 0 maps to is the bare queue name
        keys.append(f"{prefix}{queue}{sep}{step}" if step else f"{prefix}{queue}")
    if f"{prefix}{queue}" not in keys:  # priority_steps without 0: kombu still maps 0 to the bare name
        keys.insert(0, f"{prefix}{queue}")
    return keys


def class_queues(client: redis.Redis, pools: Iterable[str] = QUEUES,
                 transport_options: dict | None = None) -> set[str]:
    """Hardware-class queues (``<pool>.<class>``, ``worker.__main__``) that hold waiting messages."""
    options = transport_options or {}
    sep = options.get("sep", KOMBU_SEP)
    prefix = options.get("global_keyprefix", "") or ""
    found = set()
    for pool in pools:
        for key in client.scan_iter(match=f"{prefix}{pool}.*", count=500):
            name = (key.decode(errors="replace") if isinstance(key, bytes) else key)[len(prefix):]
            queue = name.split(sep, 1)[0]
            if queue.partition(".")[2] and client.type(key) in (b"list", "list"):
                found.add(queue)
    return found


def queue_depth(client: redis.Redis, queue: str, transport_options: dict | None = None) -> int:
    """Messages waiting in queue (all priority lists), not counting reserved (unacked) ones."""
    with client.pipeline(transaction=False) as pipe:
        for key in queue_keys(queue, transport_options):
            pipe.llen(key)
        return sum(int(n or 0) for n in pipe.execute())


def unacked_counts(client: redis.Redis, queues: Iterable[str] = QUEUES,
                   transport_options: dict | None = None) -> dict[str, int]:
    """Reserved-but-unacknowledged messages per queue (running stages, and prefetched ones).

    A queue declared as ``Queue(name)`` has exchange and routing key ``name``; a message counts
    for a queue when its routing key, else its exchange, names it.
    """
    options = transport_options or {}
    key = (options.get("global_keyprefix", "") or "") + options.get("unacked_key", KOMBU_UNACKED_KEY)
    counts = dict.fromkeys(queues, 0)
    for _tag, value in client.hscan_iter(key, count=500):
        try:
            _raw, exchange, routing_key = json.loads(value)
        except (ValueError, TypeError):
            continue
        for name in (routing_key, exchange):
            if name in counts:
                counts[name] += 1
                break
    return counts
