"""Job records in Redis: what the producer submitted and what each stage reported.

One hash per job (``modelyard:job:<id>``). Each stage, and each optimize variant, writes its
own field, so concurrent stages never overwrite each other. A terminal state (SUCCEEDED,
FAILED, CANCELLED) is final: later writes of the job state are ignored.

A finished job's record expires ``MODELYARD_JOB_RETENTION_DAYS`` after it ended (the TTL is set
with the final state); ``modelyard gc`` drops older finished records that carry no TTL.

A stage costs few Redis round trips: ``begin_stage`` is one script (cancellation check, delivery
count, job state, the stage's first record), and ``update_stage`` merges into the record this
process last wrote and stores it with a compare-and-set, so it reads the record only when
someone else changed it.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, NamedTuple

import redis

from shared.broker import redis_client

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
# A stage's state in the job record (lower case, as shown in the stage table).
STAGE_RUNNING, STAGE_DONE, STAGE_CACHED = "running", "done", "cached"
STAGE_FAILED, STAGE_CANCELLED = "failed", "cancelled"
STAGE_FINISHED = (STAGE_DONE, STAGE_CACHED, STAGE_FAILED, STAGE_CANCELLED)
PREFIX = "modelyard:job:"
INDEX = "modelyard:jobs"

# Set the job state unless it is already terminal. KEYS[1] job hash; ARGV state, time, error,
# seconds a finished record is kept.
_SET_STATE = """
local current = redis.call('HGET', KEYS[1], 'state')
if not current then return 0 end
if current == 'SUCCEEDED' or current == 'FAILED' or current == 'CANCELLED' then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'updated', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[3]) end
if ARGV[1] == 'SUCCEEDED' or ARGV[1] == 'FAILED' or ARGV[1] == 'CANCELLED' then
  redis.call('HSET', KEYS[1], 'finished', ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[4])
end
return 1
"""


# Store a stage record if the field still holds what the writer last saw. KEYS[1] job hash;
# ARGV field, the record as last seen ('' = none), the new record, time. {1} or {0, current}.
_UPDATE_STAGE = """
local current = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if current ~= ARGV[2] then return {0, current} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3], 'updated', ARGV[4])
return {1}
"""

# A stage task starts: refuse a missing or cancelled job, count this delivery, refuse a stage
# delivered too often, set the job RUNNING (unless final), write the stage's record if it has
# none. KEYS[1] job hash, KEYS[2] delivery counter; ARGV field, record, time, max deliveries,
# counter TTL. Returns {'cancelled'}, {'died', n}, {'started', n} or {'merge', n, current record}
# (then the caller merges into the existing record), n = earlier deliveries of this attempt.
_BEGIN_STAGE = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'CANCELLED' then return {'cancelled'} end
local died = redis.call('INCR', KEYS[2]) - 1
redis.call('EXPIRE', KEYS[2], ARGV[5])
if died > tonumber(ARGV[4]) then return {'died', died} end
if state ~= 'SUCCEEDED' and state ~= 'FAILED' then
  redis.call('HSET', KEYS[1], 'state', 'RUNNING', 'updated', ARGV[3])
end
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then return {'merge', died, current} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], 'updated', ARGV[3])
return {'started', died}
"""

DELIVERIES_TTL_S = 7 * 24 * 3600
_SEEN_LIMIT = 256  # stage records remembered per process (the stages it runs now)


class StageStart(NamedTuple):
    """What ``begin_stage`` found: the job cancelled (or gone), and earlier deliveries of this attempt."""

    cancelled: bool
    died: int


def new_job_id() -> str:
    return uuid.uuid4().hex[:16]


class JobStore:
    def __init__(self, client: redis.Redis, *, retention_s: float | None = None) -> None:
        """``retention_s``: how long a finished record is kept (default ``MODELYARD_JOB_RETENTION_DAYS``)."""
        if retention_s is None:
            from shared.settings import get_settings

            retention_s = get_settings().job_retention_days * 86400
        self.redis = client
        self.retention_s = max(1, int(retention_s))
        self._set_state = client.register_script(_SET_STATE)
        self._update_stage = client.register_script(_UPDATE_STAGE)
        self._begin_stage = client.register_script(_BEGIN_STAGE)
        self._seen: OrderedDict[tuple[str, str], str] = OrderedDict()  # (job, field) -> record written
        self._seen_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, *, retention_s: float | None = None, **options: Any) -> JobStore:
        """A job store on the broker's Redis (``shared.broker`` URL forms, sentinel:// too); options go to
        ``redis.Redis`` (e.g. a more patient ``retry``)."""
        settings = {"socket_connect_timeout": 5, "socket_timeout": 10, "health_check_interval": 30, **options}
        return cls(redis_client(url, **settings), retention_s=retention_s)

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
        return bool(self._set_state(keys=[PREFIX + job_id], args=[state, repr(time.time()), error, self.retention_s]))

    def update_stage(self, job_id: str, stage: str, **fields: Any) -> None:
        """Merge fields into one stage's record (each stage/variant owns its own field).

        One round trip when the record is still the one this process last wrote; otherwise the
        script answers with the current record and the merge is redone on it.
        """
        self._merge_stage(job_id, f"stage:{stage}", self._seen.get((job_id, f"stage:{stage}"), ""), fields)

    def begin_stage(self, job_id: str, stage: str, delivery: str, max_deliveries: int,
                    **fields: Any) -> StageStart:
        """Start a stage task in one round trip (two when the stage already has a record).

        Unless the job is gone or cancelled: counts this delivery under ``delivery`` (a key
        naming the task id and attempt); unless it was delivered more than ``max_deliveries``
        times before, moves the job to RUNNING (a final state stays) and merges fields into the
        stage's record.
        """
        field = f"stage:{stage}"
        record = json.dumps(fields)
        answer = self._begin_stage(keys=[PREFIX + job_id, delivery],
                                   args=[field, record, repr(time.time()), max_deliveries, DELIVERIES_TTL_S])
        outcome = answer[0].decode()
        if outcome == "cancelled":
            return StageStart(cancelled=True, died=0)
        died = int(answer[1])
        if outcome == "started":
            self._remember(job_id, field, record)
        elif outcome == "merge":
            self._merge_stage(job_id, field, answer[2].decode(), fields)
        return StageStart(cancelled=False, died=died)

    def _merge_stage(self, job_id: str, field: str, seen: str, fields: dict[str, Any]) -> None:
        while True:
            record = json.loads(seen) if seen else {}
            record.update(fields)
            written = json.dumps(record)
            answer = self._update_stage(keys=[PREFIX + job_id], args=[field, seen, written, repr(time.time())])
            if answer[0] == 1:
                self._remember(job_id, field, written)
                return
            seen = answer[1].decode()  # changed since this process wrote it: merge into what is there

    def _remember(self, job_id: str, field: str, record: str) -> None:
        with self._seen_lock:
            self._seen[(job_id, field)] = record
            self._seen.move_to_end((job_id, field))
            while len(self._seen) > _SEEN_LIMIT:
                self._seen.popitem(last=False)

    def recent(self, limit: int = 50) -> list[str]:
        return [j.decode() for j in self.redis.zrevrange(INDEX, 0, limit - 1)]

    def all_ids(self) -> list[str]:
        """Every job in the index, oldest first (a record that expired stays listed until ``delete``)."""
        return [j.decode() for j in self.redis.zrange(INDEX, 0, -1)]
