-- A tenant's rate limits, concurrency quota and stored-bytes bound, checked and charged
-- atomically.
-- KEYS[1] the tenant's token buckets (HASH), KEYS[2] the tenant's live requests (ZSET),
-- KEYS[3] the tenant's storage charges (ZSET id → lapse ms), KEYS[4] their bytes (HASH:
-- id → bytes, 'lapse:' .. id → its lapse as KEYS[3] holds it (settle.lua reads it there),
-- and 'total', 'next' when the earliest charge lapses, 'until' when the keys expire),
-- KEYS[5] (optional) set on a refusal: the enqueue sent after this call in the same round
-- trip then queues nothing (a Redis that is not a Cluster: its key is the model's)
-- ARGV: 1 now ms, 2 requests/min (0 = unlimited), 3 tokens/min (0 = unlimited),
--       4 token cost, 5 max concurrent (0 = unlimited), 6 request id, 7 live-entry expiry ms,
--       8 bytes the request will store, 9 max stored bytes (0 = unlimited),
--       10 when the storage charge lapses (ms)
-- Returns {0, ''} when admitted, else {retry after ms, reason}. A request already charged
-- (this call repeated: a pipeline sent again after Redis lost its scripts, or a retry) is
-- admitted without a second charge.
-- This runs for every request: a handful of commands whatever the tenant's history (the
-- lapsed charges are swept only when one is due, the keys' expiry moved only now and then).
local function refuse(retry_ms, reason)
  if KEYS[5] then redis.call('SET', KEYS[5], reason, 'PX', 60000) end
  return {retry_ms, reason}
end

local now = tonumber(ARGV[1])
local rpm, tpm, cost = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local max_live = tonumber(ARGV[5])
local size, max_bytes, lapse = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])

local stored = redis.call('HMGET', KEYS[4], 'total', 'next', 'until', ARGV[6])
if stored[4] then return {0, ''} end

-- The live set is kept only for a concurrency quota. Entries that outlived their
-- requests (a missed removal) age out by their expiry.
if max_live > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= max_live then
    return refuse(1000, 'concurrency')
  end
end

local total = tonumber(stored[1] or '0')
-- 'next' is never later than the earliest charge's lapse (every charge lowers it), so
-- nothing is due before it; absent (0), the charges are looked at.
local next_lapse = tonumber(stored[2] or '0')
local swept = false
if next_lapse <= now then
  -- Storage charges whose data has expired are given back, a bounded number per call.
  local old = redis.call('ZRANGE', KEYS[3], '-inf', now, 'BYSCORE', 'LIMIT', 0, 64)
  if #old > 0 then
    for _, bytes in ipairs(redis.call('HMGET', KEYS[4], unpack(old))) do
      total = total - tonumber(bytes or '0')
    end
    local fields = {}
    for i, id in ipairs(old) do
      fields[2 * i - 1] = id
      fields[2 * i] = 'lapse:' .. id
    end
    redis.call('HDEL', KEYS[4], unpack(fields))
    redis.call('ZREM', KEYS[3], unpack(old))
  end
  local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  next_lapse = first[2] and tonumber(first[2]) or lapse
  swept = true
end
if max_bytes > 0 and total + size > max_bytes then
  if swept then redis.call('HSET', KEYS[4], 'total', total, 'next', next_lapse) end
  -- Room comes back when the oldest charge lapses (a finished request's data expires)
  -- or sooner, when a queued request ends: ask again within a minute at most.
  return refuse(math.min(60000, math.max(1000, next_lapse - now)), 'stored_bytes')
end

-- Token buckets refilled continuously: capacity = the per-minute limit.
if rpm > 0 or tpm > 0 then
  local b = redis.call('HMGET', KEYS[1], 'requests', 'requests:at', 'tokens', 'tokens:at')
  local function level(value, at, limit)
    return math.min(limit, tonumber(value or limit) + (now - tonumber(at or now)) * limit / 60000)
  end
  local requests = rpm > 0 and level(b[1], b[2], rpm) or 0
  local tokens = tpm > 0 and level(b[3], b[4], tpm) or 0
  if rpm > 0 and requests < 1 then
    return refuse(math.ceil((1 - requests) * 60000 / rpm), 'requests_per_minute')
  end
  if tpm > 0 and tokens < math.min(cost, tpm) then
    return refuse(math.ceil((math.min(cost, tpm) - tokens) * 60000 / tpm), 'tokens_per_minute')
  end
  local levels = {}
  if rpm > 0 then
    levels = {'requests', tostring(requests - 1), 'requests:at', now}
  end
  if tpm > 0 then
    for _, v in ipairs({'tokens', tostring(tokens - math.min(cost, tpm)), 'tokens:at', now}) do
      levels[#levels + 1] = v
    end
  end
  redis.call('HSET', KEYS[1], unpack(levels))
  redis.call('PEXPIRE', KEYS[1], 120000)
end
if max_live > 0 then redis.call('ZADD', KEYS[2], tonumber(ARGV[7]), ARGV[6]) end

redis.call('ZADD', KEYS[3], lapse, ARGV[6])
local charge = {ARGV[6], size, 'lapse:' .. ARGV[6], lapse, 'total', total + size, 'next',
  math.min(next_lapse, lapse)}
-- The keys outlive the last charge: their expiry moves an hour past it at a time.
local expires = tonumber(stored[3] or '0')
if lapse > expires then
  expires = lapse + 3600000
  charge[#charge + 1] = 'until'
  charge[#charge + 1] = expires
  redis.call('PEXPIREAT', KEYS[3], expires)
  redis.call('PEXPIREAT', KEYS[4], expires)
end
redis.call('HSET', KEYS[4], unpack(charge))
return {0, ''}
