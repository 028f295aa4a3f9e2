"""Job records in Redis: what the producer submitted and what each stage reported.

One hash per job (``modelyard:job:<id>``). Each stage, and each optimize variant, writes its
own field, so concurrent stages never overwrite each other. A terminal state (SUCCEEDED,
FAILED, CANCELLED) is final: later writes of the job state are ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
PREFIX = "modelyard:job:"
INDEX = "modelyard:jobs"

# Set the job state unless it is already terminal. KEYS[1] job hash; ARGV state, time, error.
_SET_STATE = """
local current = redis.call('HGET', KEYS[1], 'state')
if not current then return 0 end
if current == 'SUCCEEDED' or current == 'FAILED' or current == 'CANCELLED' then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'updated', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[3]) end
if ARGV[1] == 'SUCCEEDED' or ARGV[1] == 'FAILED' or ARGV[1] == 'CANCELLED' then
  redis.call('HSET', KEYS[1], 'finished', ARGV[2])
end
return 1
"""


def new_job_id() -> str:
    return uuid.uuid4().hex[:16]


class JobStore:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._set_state = client.register_script(_SET_STATE)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> JobStore:
        """A job store on the Redis at url; options go to ``redis.Redis`` (e.g. a more patient ``retry``)."""
        settings = {"socket_connect_timeout": 5, "socket_timeout": 30, "health_check_interval": 30, **options}
        return cls(redis.Redis.from_url(url, **settings))

    def create(self, job_id: str, fields: dict[str, Any]) -> None:
        now = time.time()
        record = {k: json.dumps(v) for k, v in fields.items()}
        record.update(state=QUEUED, created=repr(now), updated=repr(now))
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(PREFIX + job_id, mapping=record)
        pipe.zadd(INDEX, {job_id: now})
        pipe.execute()

    def delete(self, job_id: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(PREFIX + job_id)
        pipe.zrem(INDEX, job_id)
        pipe.execute()

    def exists(self, job_id: str) -> bool:
        return bool(self.redis.exists(PREFIX + job_id))

    def get(self, job_id: str) -> dict[str, Any] | None:
        raw = self.redis.hgetall(PREFIX + job_id)
        if not raw:
            return None
        job: dict[str, Any] = {"id": job_id, "stages": {}}
        for key, value in raw.items():
            key, value = key.decode(), value.decode()
            if key.startswith("stage:"):
                job["stages"][key[len("stage:"):]] = json.loads(value)
            elif key in ("state", "error"):
                job[key] = value
            elif key in ("created", "updated", "finished"):
                job[key] = float(value)
            else:
                job[key] = json.loads(value)
        return job

    def field(self, job_id: str, name: str) -> Any:
        value = self.redis.hget(PREFIX + job_id, name)
        return None if value is None else json.loads(value)

    def set_fields(self, job_id: str, **fields: Any) -> None:
        self.redis.hset(PREFIX + job_id, mapping={k: json.dumps(v) for k, v in fields.items()})

    def state(self, job_id: str) -> str | None:
        value = self.redis.hget(PREFIX + job_id, "state")
        return value.decode() if value else None

    def set_state(self, job_id: str, state: str, error: str = "") -> bool:
        """Move the job to state; False when it was already terminal (or does not exist)."""
        return bool(self._set_state(keys=[PREFIX + job_id], args=[state, repr(time.time()), error]))

    def update_stage(self, job_id: str, stage: str, **fields: Any) -> None:
        """Merge fields into one stage's record (each stage/variant owns its own field)."""
        key = PREFIX + job_id
        current = self.redis.hget(key, f"stage:{stage}")
        record = json.loads(current) if current else {}
        record.update(fields)
        self.redis.hset(key, mapping={f"stage:{stage}": json.dumps(record), "updated": repr(time.time())})

    def recent(self, limit: int = 50) -> list[str]:
        return [j.decode() for j in self.redis.zrevrange(INDEX, 0, limit - 1)]
