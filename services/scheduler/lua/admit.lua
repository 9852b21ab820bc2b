-- A tenant's rate limits, concurrency quota and stored-bytes bound, checked and charged
-- atomically.
-- KEYS[1] the tenant's token buckets (HASH), KEYS[2] the tenant's live requests (ZSET),
-- KEYS[3] the tenant's storage charges (ZSET id → lapse ms), KEYS[4] their bytes (HASH)
-- ARGV: 1 now ms, 2 requests/min (0 = unlimited), 3 tokens/min (0 = unlimited),
--       4 token cost, 5 max concurrent (0 = unlimited), 6 request id, 7 live-entry expiry ms,
--       8 bytes the request will store, 9 max stored bytes (0 = unlimited),
--       10 when the storage charge lapses (ms)
-- Returns {0, ''} when admitted, else {retry after ms, reason}.
local now = tonumber(ARGV[1])
local rpm, tpm, cost = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local max_live = tonumber(ARGV[5])
local size, max_bytes = tonumber(ARGV[8]), tonumber(ARGV[9])

-- Live requests whose entries outlived them (a missed removal) age out by their expiry.
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if max_live > 0 and redis.call('ZCARD', KEYS[2]) >= max_live then
  return {1000, 'concurrency'}
end

-- Storage charges whose data has expired are given back, a bounded number per call.
for _, old in ipairs(redis.call('ZRANGE', KEYS[3], '-inf', now, 'BYSCORE', 'LIMIT', 0, 64)) do
  local bytes = tonumber(redis.call('HGET', KEYS[4], old) or '0')
  redis.call('HINCRBY', KEYS[4], 'total', -bytes)
  redis.call('HDEL', KEYS[4], old)
  redis.call('ZREM', KEYS[3], old)
end
if max_bytes > 0 then
  local total = tonumber(redis.call('HGET', KEYS[4], 'total') or '0')
  if total + size > max_bytes then
    -- Room comes back when the oldest charge lapses (a finished request's data expires)
    -- or sooner, when a queued request ends: ask again within a minute at most.
    local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
    local wait = 60000
    if first[2] then wait = math.min(wait, math.max(1000, tonumber(first[2]) - now)) end
    return {wait, 'stored_bytes'}
  end
end

-- Token buckets refilled continuously: capacity = the per-minute limit.
local function level(name, limit)
  local value = tonumber(redis.call('HGET', KEYS[1], name) or limit)
  local at = tonumber(redis.call('HGET', KEYS[1], name .. ':at') or now)
  return math.min(limit, value + (now - at) * limit / 60000)
end
local requests = rpm > 0 and level('requests', rpm) or 0
local tokens = tpm > 0 and level('tokens', tpm) or 0
if rpm > 0 and requests < 1 then
  return {math.ceil((1 - requests) * 60000 / rpm), 'requests_per_minute'}
end
if tpm > 0 and tokens < math.min(cost, tpm) then
  return {math.ceil((math.min(cost, tpm) - tokens) * 60000 / tpm), 'tokens_per_minute'}
end
if rpm > 0 then
  redis.call('HSET', KEYS[1], 'requests', tostring(requests - 1), 'requests:at', now)
end
if tpm > 0 then
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - math.min(cost, tpm)), 'tokens:at', now)
end
if rpm > 0 or tpm > 0 then redis.call('PEXPIRE', KEYS[1], 120000) end
if max_live > 0 then redis.call('ZADD', KEYS[2], tonumber(ARGV[7]), ARGV[6]) end
redis.call('HSET', KEYS[4], ARGV[6], size)
redis.call('HINCRBY', KEYS[4], 'total', size)
redis.call('ZADD', KEYS[3], tonumber(ARGV[10]), ARGV[6])
local lapse = redis.call('ZRANGE', KEYS[3], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[3], lapse[2])
redis.call('PEXPIREAT', KEYS[4], lapse[2])
return {0, ''}
