"""The class store in Redis, shared by every replica of a deployment whatever bundle each serves.

Key schema (`P` = `{redis_prefix}:added-classes`; the Redis prefix is the deployment's namespace):

    P:meta          hash     format, epoch, version, digest, created
    P:records       hash     name key -> record JSON (with its seq)
    P:log           sorted   the last `LOG_LENGTH` changes: score seq, member {"seq", "op", "key", "digest"}
    P:derived:B     hash     fingerprint -> derived data JSON of bundle id B
    P:events        pub/sub  each change publishes the new version

Every change is one Lua script, so it is atomic: an add refuses a name that exists (returning the stored
record, which makes identical retries idempotent), bumps the version, extends the digest chain, appends to the
log, stores the writer's derived data and publishes. Readers apply the log incrementally when it starts at the
state they have, and otherwise read everything.

Durability is Redis's: with the shipped `appendonly yes` + `appendfsync always` (docker-compose.yml,
deploy/k8s/redis-statefulset.yaml) Redis writes and fsyncs its append-only file before it answers, so an
acknowledged add survives `kill -9` of Redis and a power loss. `durability()` reads the server's settings so
the service can say at start what an add survives.

The previous version kept classes under `{redis_prefix}:classes:{bundle_id}`; when `P:meta` does not exist,
the store is created from those (see `vlltr.service.store_legacy`), which are left in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import cast

from vlltr.errors import ClassNotFoundError, StoreUnavailableError
from vlltr.service.redis_link import RedisLink, make_client, safe_url
from vlltr.service.store import (
    EMPTY_DIGEST,
    STORE_FORMAT_VERSION,
    AddResult,
    ClassRecord,
    Derived,
    NewClass,
    Quarantined,
    RecordError,
    StoreDelta,
    StoreSnapshot,
    StoreState,
    new_epoch,
)
from vlltr.service.store_legacy import LegacyData, merge_sections

log = logging.getLogger(__name__)

LOG_LENGTH = 10_000  # changes kept for incremental sync; a replica further behind reloads everything
ADD_BATCH = 256  # classes per add script, so one bulk add never holds Redis for long

_ADD_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'uninitialized'} end
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'version', 'digest')
local v = tonumber(meta[2])
local d = meta[3]
local out = {meta[1], '', ''}
local added = false
for i = 0, tonumber(ARGV[2]) - 1 do
  local key, rec, fp, der = ARGV[3 + 4 * i], ARGV[4 + 4 * i], ARGV[5 + 4 * i], ARGV[6 + 4 * i]
  local existing = redis.call('HGET', KEYS[2], key)
  if existing then
    table.insert(out, '0')
    table.insert(out, existing)
  else
    v = v + 1
    local stored = '{"seq":' .. v .. ',' .. string.sub(rec, 2)
    redis.call('HSET', KEYS[2], key, stored)
    d = redis.sha1hex(d .. '\\n' .. v .. '\\tadd\\t' .. key .. '\\t' .. fp)
    redis.call('ZADD', KEYS[3], v, cjson.encode({seq = v, op = 'add', key = key, digest = d}))
    if der ~= '' then redis.call('HSET', KEYS[5], fp, der) end
    table.insert(out, '1')
    table.insert(out, stored)
    added = true
  end
end
if added then
  redis.call('HSET', KEYS[1], 'version', v, 'digest', d)
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -(tonumber(ARGV[1]) + 1))
  redis.call('PUBLISH', KEYS[4], v)
end
out[2] = tostring(v)
out[3] = d
return out
"""

_REMOVE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
if redis.call('HDEL', KEYS[2], ARGV[1]) == 0 then return {'missing'} end
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'version', 'digest')
local v = tonumber(meta[2]) + 1
local d = redis.sha1hex(meta[3] .. '\\n' .. v .. '\\tremove\\t' .. ARGV[1] .. '\\t')
redis.call('ZADD', KEYS[3], v, cjson.encode({seq = v, op = 'remove', key = ARGV[1], digest = d}))
redis.call('HSET', KEYS[1], 'version', v, 'digest', d)
redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -(tonumber(ARGV[2]) + 1))
redis.call('PUBLISH', KEYS[4], v)
return {meta[1], tostring(v), d}
"""

_CHANGES_LUA = """
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'version', 'digest')
if not meta[1] then return {} end
local entries = redis.call('ZRANGEBYSCORE', KEYS[3], ARGV[1], '+inf')
local out = {meta[1], meta[2], meta[3], tostring(#entries)}
for _, e in ipairs(entries) do table.insert(out, e) end
local seen = {}
for _, e in ipairs(entries) do
  local key = cjson.decode(e).key
  if not seen[key] then
    seen[key] = true
    table.insert(out, key)
    table.insert(out, redis.call('HGET', KEYS[2], key) or '')
  end
end
return out
"""

_INIT_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2], KEYS[3])
local v, d = 0, '0'
for i = 0, tonumber(ARGV[3]) - 1 do
  local key, rec, fp = ARGV[4 + 3 * i], ARGV[5 + 3 * i], ARGV[6 + 3 * i]
  v = v + 1
  redis.call('HSET', KEYS[2], key, '{"seq":' .. v .. ',' .. string.sub(rec, 2))
  d = redis.sha1hex(d .. '\\n' .. v .. '\\tadd\\t' .. key .. '\\t' .. fp)
  redis.call('ZADD', KEYS[3], v, cjson.encode({seq = v, op = 'add', key = key, digest = d}))
end
redis.call('HSET', KEYS[1], 'format', ARGV[4 + 3 * tonumber(ARGV[3])], 'epoch', ARGV[1], 'version', v,
  'digest', d, 'created', ARGV[2])
redis.call('PUBLISH', KEYS[4], v)
return 1
"""


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


class RedisClassStore:
    """Added classes of a deployment in Redis (see the module docstring for the keys).

    Args:
        link: the shared Redis connection and its breaker.
        prefix: the deployment's Redis key prefix (`VLLTR_REDIS_PREFIX`).
    """

    def __init__(self, link: RedisLink, *, prefix: str) -> None:
        self.link = link
        self.prefix = prefix
        base = f"{prefix}:added-classes"
        self.meta_key = f"{base}:meta"
        self.records_key = f"{base}:records"
        self.log_key = f"{base}:log"
        self.channel = f"{base}:events"
        self.derived_prefix = f"{base}:derived:"
        self._keys = [self.meta_key, self.records_key, self.log_key, self.channel]
        client = link.store_client
        self._add = client.register_script(_ADD_LUA)
        self._remove = client.register_script(_REMOVE_LUA)
        self._changes = client.register_script(_CHANGES_LUA)
        self._init = client.register_script(_INIT_LUA)
        self._resubscribed = 0
        self._parsed: dict[bytes, ClassRecord | Quarantined] = {}  # raw stored value -> parsed, reused

    @property
    def reconnects(self) -> int:
        return self.link.generation + self._resubscribed

    def describe(self) -> str:
        return f"Redis at {safe_url(self.link.url)}, prefix {self.prefix!r}"

    def _unavailable(self, exc: BaseException | None = None) -> StoreUnavailableError:
        if exc is not None:
            self.link.failed(exc)
        return StoreUnavailableError("the class store (Redis) is unavailable; try again shortly")

    # ---- creation and migration --------------------------------------------------------------

    async def _ensure(self) -> None:
        """Create the store when it does not exist, from the previous version's keys when there are any."""
        client = self.link.store_client
        sections: dict[str, dict[str, object]] = {}
        problems: list[str] = []
        old = f"{self.prefix}:classes:"
        async for raw_key in client.scan_iter(match=_glob_escape(old) + "*", count=1000):
            name = _text(raw_key)
            bundle_id = name[len(old) :]
            if bundle_id.endswith((":version", ":events")) or await client.type(raw_key) != b"hash":
                continue
            section: dict[str, object] = {}
            for field, value in (await client.hgetall(raw_key)).items():
                try:
                    section[_text(field)] = json.loads(value)
                except ValueError:
                    problems.append(f"{name} field {_text(field)!r} is not JSON; not migrated")
            sections[bundle_id] = section
        legacy = merge_sections(sections) if sections else LegacyData()
        # Records left without their meta key (it alone was deleted) are kept rather than dropped.
        leftovers = await client.hgetall(self.records_key)
        if leftovers:
            kept = []
            for value in leftovers.values():
                try:
                    kept.append(ClassRecord.loads(value, seq=0))
                except RecordError as exc:
                    problems.append(f"{self.records_key}: {exc}; not kept")
            known = {r.key for r in kept}
            legacy.records = kept + [r for r in legacy.records if r.key not in known]
        args: list[str] = [new_epoch(), datetime.now(UTC).isoformat(timespec="seconds"), str(len(legacy.records))]
        for record in legacy.records:
            args += [record.key, record.dumps(), record.fingerprint]
        args.append(str(STORE_FORMAT_VERSION))
        created = await self._init(keys=self._keys, args=args)
        if not int(created):
            return  # another replica created it first
        for problem in legacy.problems + problems:
            log.warning("class store migration: %s", problem)
        for bundle_id, items in legacy.derived.items():
            await self._put_derived(bundle_id, items)
        if sections or leftovers:
            log.warning(
                "class store %s created from the previous layout: %d classes from %d bundle section(s) under %s*",
                self.describe(),
                len(legacy.records),
                len(sections),
                old,
            )
        else:
            log.info("class store %s created (empty)", self.describe())

    # ---- reading -----------------------------------------------------------------------------

    async def state(self) -> StoreState:
        if not self.link.available():
            raise self._unavailable()
        try:
            epoch, version, digest = await self.link.store_client.hmget(self.meta_key, ["epoch", "version", "digest"])
            if epoch is None:
                await self._ensure()
                epoch, version, digest = await self.link.store_client.hmget(
                    self.meta_key, ["epoch", "version", "digest"]
                )
        except Exception as exc:
            raise self._unavailable(exc) from exc
        self.link.succeeded()
        return StoreState(_text(epoch), int(version or 0), _text(digest) or EMPTY_DIGEST)

    async def snapshot(self) -> StoreSnapshot:
        await self.state()  # creates the store when missing
        try:
            async with self.link.store_client.pipeline(transaction=True) as pipe:
                pipe.hmget(self.meta_key, ["epoch", "version", "digest"])
                pipe.hgetall(self.records_key)
                (epoch, version, digest), raw = await pipe.execute()
        except Exception as exc:
            raise self._unavailable(exc) from exc
        self.link.succeeded()
        records: list[ClassRecord] = []
        quarantined: list[Quarantined] = []
        parsed: dict[bytes, ClassRecord | Quarantined] = {}
        for field, value in raw.items():
            item = self._parse(_text(field), value)
            parsed[value] = item
            (records if isinstance(item, ClassRecord) else quarantined).append(item)  # type: ignore[arg-type]
        self._parsed = parsed
        records.sort(key=lambda r: (r.seq, r.key))
        state = StoreState(_text(epoch), int(version or 0), _text(digest) or EMPTY_DIGEST)
        return StoreSnapshot(state, tuple(records), tuple(quarantined))

    def _parse(self, key: str, value: bytes) -> ClassRecord | Quarantined:
        known = self._parsed.get(value)
        if known is not None:
            return known
        try:
            return ClassRecord.loads(value)
        except RecordError as exc:
            return Quarantined(key, str(exc), _text(value))

    async def changes_since(self, base: StoreState) -> StoreDelta | None:
        try:
            out = await self._changes(keys=self._keys[:3], args=[base.version])
        except Exception as exc:
            raise self._unavailable(exc) from exc
        self.link.succeeded()
        if not out:
            return None
        epoch, version, digest, n = _text(out[0]), int(out[1] or 0), _text(out[2]), int(out[3])
        state = StoreState(epoch, version, digest)
        if epoch != base.epoch or version < base.version:
            return None
        entries = []
        for raw in out[4 : 4 + n]:
            try:
                e = json.loads(raw)
                entries.append((int(e["seq"]), str(e["op"]), str(e["key"]), str(e["digest"])))
            except (ValueError, KeyError, TypeError):
                return None  # a log entry that cannot be read: read everything instead
        # The log must start exactly at the reader's state and have no gaps up to the store's version.
        if base.version == 0:
            if base.digest != EMPTY_DIGEST or (entries and entries[0][0] != 1):
                return None
        elif not entries or entries[0][0] != base.version or entries[0][3] != base.digest:
            return None
        else:
            entries = entries[1:]
        if [e[0] for e in entries] != list(range(base.version + 1, version + 1)):
            return None
        current = {_text(out[i]): out[i + 1] for i in range(4 + n, len(out), 2)}
        removed = tuple(dict.fromkeys(key for _, op, key, _ in entries if op == "remove"))
        added: list[ClassRecord] = []
        quarantined: list[Quarantined] = []
        for key in dict.fromkeys(key for _, _, key, _ in entries):
            value = current.get(key) or b""
            if not value:
                continue
            item = self._parse(key, value)
            if isinstance(item, Quarantined):
                quarantined.append(item)
            elif item.seq > base.version:
                added.append(item)
        added.sort(key=lambda r: r.seq)
        return StoreDelta(base, state, tuple(added), removed, tuple(quarantined))

    async def derived(self, bundle_id: str, fingerprints: Sequence[str]) -> dict[str, Derived | RecordError]:
        if not fingerprints:
            return {}
        try:
            values = await self.link.store_client.hmget(self.derived_prefix + bundle_id, list(fingerprints))
        except Exception as exc:
            raise self._unavailable(exc) from exc
        out: dict[str, Derived | RecordError] = {}
        for fp, value in zip(fingerprints, values):
            if value is None:
                continue
            try:
                out[fp] = Derived.loads(value)
            except RecordError as exc:
                out[fp] = exc
        return out

    # ---- writing -----------------------------------------------------------------------------

    async def add_many(self, items: Sequence[NewClass]) -> list[AddResult]:
        results: list[AddResult] = []
        for start in range(0, len(items), ADD_BATCH):
            results += await self._add_batch(items[start : start + ADD_BATCH])
        return results

    async def _add_batch(self, items: Sequence[NewClass]) -> list[AddResult]:
        # Derived data goes to one bundle's hash per script call: group consecutive items by bundle.
        bundle_id = next((i.bundle_id for i in items if i.bundle_id is not None), None)
        if any(i.bundle_id not in (None, bundle_id) for i in items):
            first = [i for i in items if i.bundle_id in (None, bundle_id)]
            rest = [i for i in items if i.bundle_id not in (None, bundle_id)]
            return await self._add_batch(first) + await self._add_batch(rest)
        args: list[str] = [str(LOG_LENGTH), str(len(items))]
        for item in items:
            derived = item.derived.dumps() if item.derived is not None and item.bundle_id is not None else ""
            args += [item.record.key, item.record.dumps(), item.record.fingerprint, derived]
        keys = [*self._keys, self.derived_prefix + (bundle_id or "-")]
        try:
            # A pooled connection to a Redis that restarted is retried once on a new one by the store's client
            # (`make_client(reconnect_once=True)`): an add is idempotent, so that is safe here.
            out = await self._add(keys=keys, args=args)
            if _text(out[0]) == "uninitialized":
                await self._ensure()
                out = await self._add(keys=keys, args=args)
        except Exception as exc:
            raise self._unavailable(exc) from exc
        self.link.succeeded()
        state = StoreState(_text(out[0]), int(out[1]), _text(out[2]))
        results = []
        for i in range(len(items)):
            created, stored = _text(out[3 + 2 * i]) == "1", out[4 + 2 * i]
            try:
                record = ClassRecord.loads(stored)
            except RecordError:
                # The name is taken by a record that cannot be read (quarantined): report it as that.
                record = ClassRecord(items[i].record.name, (), seq=-1)
            results.append(AddResult(record, created, state))
        return results

    async def remove(self, key: str) -> StoreState:
        try:
            out = await self._remove(keys=self._keys, args=[key, str(LOG_LENGTH)])
        except Exception as exc:
            raise self._unavailable(exc) from exc
        self.link.succeeded()
        if _text(out[0]) == "missing":
            raise ClassNotFoundError(f"no added class named {key!r}")
        return StoreState(_text(out[0]), int(out[1]), _text(out[2]))

    async def put_derived(self, bundle_id: str, items: Sequence[Derived]) -> None:
        try:
            await self._put_derived(bundle_id, items)
        except Exception as exc:
            raise self._unavailable(exc) from exc

    async def _put_derived(self, bundle_id: str, items: Sequence[Derived]) -> None:
        for start in range(0, len(items), ADD_BATCH):
            chunk = items[start : start + ADD_BATCH]
            if chunk:
                await self.link.store_client.hset(
                    self.derived_prefix + bundle_id, mapping={d.fingerprint: d.dumps() for d in chunk}
                )

    # ---- the rest ----------------------------------------------------------------------------

    async def durability(self) -> str:
        """What an acknowledged add survives on this Redis, from its persistence settings (one line)."""
        try:
            config = await self.link.store_client.config_get("append*")
        except Exception as exc:  # CONFIG may be disabled on a managed Redis
            return f"unknown (CONFIG GET is not allowed: {type(exc).__name__})"
        appendonly = _text(config.get(b"appendonly", config.get("appendonly")))  # type: ignore[call-overload]
        fsync = _text(config.get(b"appendfsync", config.get("appendfsync")))  # type: ignore[call-overload]
        if appendonly != "yes":
            return "appendonly is off: an add survives only what this Redis's snapshots keep"
        if fsync == "always":
            return "appendonly with appendfsync always: an add survives kill -9 of Redis and a power loss"
        return (
            f"appendonly with appendfsync {fsync}: an add survives kill -9 of Redis, "
            "but a power loss may lose the last second"
        )

    async def watch(self, on_change: Callable[[bool], None]) -> None:
        # A dedicated connection without a read timeout: a subscription is idle most of the time.
        client = make_client(self.link.url, None, self.link.retry_s)
        lost = False
        try:
            while True:
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                try:
                    await pubsub.subscribe(self.channel)
                    if lost:
                        self._resubscribed += 1
                    on_change(lost)  # changes made while we were not subscribed
                    lost = False
                    while True:
                        message = await pubsub.get_message(timeout=1.0)
                        if message is not None:
                            on_change(False)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.debug("class-store subscription lost (%s); resubscribing", exc)
                    lost = True
                    await asyncio.sleep(self.link.retry_s)
                finally:
                    with contextlib.suppress(Exception):
                        # redis-py annotated PubSub.aclose only in 8.x; the cast type-checks under either.
                        await cast(Callable[[], Awaitable[None]], pubsub.aclose)()
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def close(self) -> None:
        return None
