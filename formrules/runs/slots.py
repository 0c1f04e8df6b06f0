"""`concurrency: N`: at most N Runs of one node at once, across every worker (Redis).

A counting semaphore with a lease per Run: a sorted set per node whose members are Run
ids, scored with the time their lease runs out. Taking a slot first drops expired leases,
so a worker killed mid-step (SIGKILL, OOM) never keeps its slot for longer than the lease
(`stale_seconds`, the time after which its Run is resumed elsewhere too); a live execution
renews its lease with every heartbeat. Each call is one Lua script (atomic on the server,
with the server's clock, so workers' clocks need not agree). No library found fits a
semaphore with per-holder expiry (`limits` counts requests in windows, python-redis-lock
is a mutex), hence these few lines.

A Run that finds no free slot is not failed: `formrules.runs.job` leaves it pending,
marked waiting for a slot (parked). A Run giving its slot back wakes the one waiting
longest (due now, dispatched at once); a parked Run also looks again by itself after
about a lease's length, for a slot freed by a lease running out (a killed worker).
"""

from __future__ import annotations

from redis import Redis

# KEYS[1] the node's set; ARGV: member, limit, lease ms. Returns 1 taken, 2 already held
# (a resumed Run whose old lease has not run out yet: renewed), 0 full.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local until_ms = now + tonumber(ARGV[3])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], until_ms, ARGV[1])
  return 2
end
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], until_ms, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
"""

# Renew a held lease (XX: never re-takes one that ran out and may be someone else's now).
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local renewed = redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return renewed
"""

TAKEN, HELD, FULL = 1, 2, 0


class Slots:
    """The slots of one node (`form_id` + node path) for Runs of that node."""

    def __init__(self, redis: Redis, prefix: str, form_id: str, path: str, limit: int,
                 lease_seconds: float):
        self.redis = redis
        self.key = f"{prefix}:slots:{form_id}:{path}"
        self.limit = limit
        self.lease_ms = max(1000, int(lease_seconds * 1000))

    def acquire(self, run_id: str) -> int:
        """TAKEN, HELD (this Run had it already) or FULL."""
        return int(self.redis.eval(_ACQUIRE, 1, self.key, run_id, self.limit, self.lease_ms))

    def renew(self, run_id: str) -> bool:
        """Extend this Run's lease; False when it had run out (the slot may be gone)."""
        return bool(self.redis.eval(_RENEW, 1, self.key, run_id, self.lease_ms))

    def release(self, run_id: str) -> None:
        """Give the slot back (the Run ended, or stopped for now)."""
        self.redis.zrem(self.key, run_id)

    def holders(self) -> list[str]:
        """Run ids holding a slot right now (expired leases may still be listed)."""
        return [m.decode() for m in self.redis.zrange(self.key, 0, -1)]
