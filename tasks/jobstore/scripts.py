"""The job store's Lua scripts: each state transition that must happen once is one script (see
tasks.jobstore)."""

# Lua: append an event to a job's stream (KEYS[2]; the job record is KEYS[1]), capped at ARGV
# maxlen entries; a stream that has no TTL yet (just made) gets the record's remaining lifetime,
# so it expires with the job.
_EMIT = """
local function emit(maxlen, kind, data)
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'type', kind, 'data', data)
  if redis.call('PTTL', KEYS[2]) == -1 then
    local ttl = redis.call('PTTL', KEYS[1])
    if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
  end
end
"""

# Lua: the Redis server's clock in seconds, as ``now`` (outbox scores use the server's clock: no
# skew between the gateway's and the workers' hosts).
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
"""

# KEYS: request key (the owner's), new job key, outbox, job's event stream, owner's job index
# (sorted set), the request's claim from before claims were per key, the index of every job, the
# owner's live jobs (set), the owner's submissions of the last minute (sorted set).
# ARGV: claim JSON, ttl, job key prefix, job id, events maxlen, "queued" event data, creation time
# (index score), index entries older than this are dropped, owner ("" without API keys), most live
# jobs (0: no limit), most submissions a minute (0: no limit), then the record's fields.
#
# An existing claim wins while its record exists; a claim whose record is gone is replaced. A
# claim made before claims were per key counts when its job is this owner's. Only then are the
# limits checked (a repeated request is never refused): live jobs are the owner's set, from which
# jobs that finished or expired are dropped first (nothing to drift); submissions are counted over
# the last 60 s. A refusal returns {"limit", name, seconds until a retry may pass}. A new job is
# due in the outbox at once, has its first event, and enters its owner's index (which lives as long
# as its newest job), the index of every job and its owner's live jobs.
_CREATE = _NOW + """
local function live_claim(text)
  local ok, existing = pcall(cjson.decode, text)
  if ok and type(existing) == 'table' and existing['job_id'] then
    return existing['job_id']
  end
  return nil
end
local claim = redis.call('GET', KEYS[1])
if claim then
  local id = live_claim(claim)
  if id and redis.call('EXISTS', ARGV[3] .. id) == 1 then return claim end
elseif ARGV[9] ~= '' then
  local legacy = redis.call('GET', KEYS[6])
  if legacy then
    local id = live_claim(legacy)
    if id and redis.call('HGET', ARGV[3] .. id, 'owner') == ARGV[9] then return legacy end
  end
end
local max_live, max_rate = tonumber(ARGV[10]), tonumber(ARGV[11])
if max_live > 0 then
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[8])) do
    local key = ARGV[3] .. id
    if redis.call('EXISTS', key) == 0 or redis.call('HEXISTS', key, 'finished_at') == 1 then
      redis.call('SREM', KEYS[8], id)
    end
  end
  if redis.call('SCARD', KEYS[8]) >= max_live then return {'limit', 'max_active_jobs', 0} end
end
if max_rate > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[9], '-inf', now - 60)
  if redis.call('ZCARD', KEYS[9]) >= max_rate then
    local oldest = redis.call('ZRANGE', KEYS[9], 0, 0, 'WITHSCORES')
    return {'limit', 'max_submissions_per_minute', tostring(tonumber(oldest[2]) + 60 - now)}
  end
  redis.call('ZADD', KEYS[9], now, ARGV[4])
  redis.call('EXPIRE', KEYS[9], 61)
end
redis.call('HSET', KEYS[2], unpack(ARGV, 12))
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('ZADD', KEYS[3], now, ARGV[4])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*', 'type', 'job', 'data', ARGV[6])
redis.call('EXPIRE', KEYS[4], ARGV[2])
for _, index in ipairs({KEYS[5], KEYS[7]}) do
  redis.call('ZADD', index, ARGV[7], ARGV[4])
  redis.call('ZREMRANGEBYSCORE', index, '-inf', '(' .. ARGV[8])
  redis.call('EXPIRE', index, ARGV[2])
end
if ARGV[9] ~= '' then
  redis.call('SADD', KEYS[8], ARGV[4])
  redis.call('EXPIRE', KEYS[8], ARGV[2])
end
return false
"""

# KEYS: a schedule (the outbox, the deliveries). ARGV: most entries, lease seconds, grace seconds.
# The entries due at least grace seconds ago (oldest first), each moved to "due again when the
# lease ends".
_CLAIM_DUE = _NOW + """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]), 'LIMIT', 0,
                       tonumber(ARGV[1]))
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), id)
end
return ids
"""

# KEYS: job key, outbox. ARGV: job id. Marks the job dispatched (a record that expired meanwhile is
# not recreated) and takes it out of the outbox.
_DISPATCHED = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'dispatched', 1) end
return redis.call('ZREM', KEYS[2], ARGV[1])
"""

# KEYS: a schedule. ARGV: seconds, job id, then "XX" to move an entry only while it is there.
# The job's entry is due in that many seconds.
_SCHEDULE = _NOW + """
if ARGV[3] == 'XX' then
  return redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[2])
end
return redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
"""

# KEYS: job key, its event stream. ARGV: events maxlen, the final "job" event's data, seconds the
# stream is kept from now, the prefix of the owners' live-job sets, the job id, then field/value
# pairs. Sets them, and emits the event, only when the job exists and is not finished; the stream
# then expires sooner than the record, unless the record expires first. The job leaves its owner's
# live jobs (the set is named from the record's owner: a single Redis, not a cluster).
_FINISH = _EMIT + """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'finished_at') == 1 then
  return 0
end
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner then redis.call('SREM', ARGV[4] .. owner, ARGV[5]) end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
emit(ARGV[1], 'job', ARGV[2])
local keep = tonumber(ARGV[3]) * 1000
local ttl = redis.call('PTTL', KEYS[2])
if ttl < 0 or ttl > keep then redis.call('PEXPIRE', KEYS[2], keep) end
return 1
"""

# KEYS: job key, its event stream. ARGV: stem field, stem JSON, now, "1" when the stem is running,
# events maxlen, the stem event's type and data, the data of a "job running" event. A record that
# expired is not recreated. A running stem makes a queued job running (final states are set by
# finish), and that change has its own event, before the stem's.
_UPDATE_STEM = _EMIT + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], 'updated_at', ARGV[3])
if ARGV[4] == '1' then
  redis.call('HSETNX', KEYS[1], 'started_at', ARGV[3])
  if redis.call('HGET', KEYS[1], 'state') == 'queued' then
    redis.call('HSET', KEYS[1], 'state', 'running')
    emit(ARGV[5], 'job', ARGV[8])
  end
end
emit(ARGV[5], ARGV[6], ARGV[7])
return 1
"""

# KEYS: job key, its event stream. ARGV: now, events maxlen, the "cancelling" job event's data, the
# caller's owner id, or "*" for a caller who may cancel every job. -1: no such job (or another
# owner's); 0: the job is finished (nothing changes); 1: cancellation requested (now, or already
# before: the state and event are written once).
_CANCEL = _EMIT + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if ARGV[4] ~= '*' and (redis.call('HGET', KEYS[1], 'owner') or '') ~= ARGV[4] then return -1 end
if redis.call('HEXISTS', KEYS[1], 'finished_at') == 1 then return 0 end
if redis.call('HSETNX', KEYS[1], 'cancel_requested_at', ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'state', 'cancelling', 'updated_at', ARGV[1])
  emit(ARGV[2], 'job', ARGV[3])
end
return 1
"""

# KEYS: lock key. ARGV: token. Deletes the lock only when this token still holds it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
