-- A tenant's rate limits and concurrency quota, checked and charged atomically.
-- KEYS[1] the tenant's token buckets (HASH), KEYS[2] the tenant's live requests (ZSET)
-- ARGV: 1 now ms, 2 requests/min (0 = unlimited), 3 tokens/min (0 = unlimited),
--       4 token cost, 5 max concurrent (0 = unlimited), 6 request id, 7 live-entry expiry ms
-- Returns {0, ''} when admitted, else {retry after ms, reason}.
local now = tonumber(ARGV[1])
local rpm, tpm, cost = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local max_live = tonumber(ARGV[5])

-- Live requests whose entries outlived them (a missed removal) age out by their expiry.
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if max_live > 0 and redis.call('ZCARD', KEYS[2]) >= max_live then
  return {1000, 'concurrency'}
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
redis.call('PEXPIRE', KEYS[1], 120000)
redis.call('ZADD', KEYS[2], tonumber(ARGV[7]), ARGV[6])
return {0, ''}
