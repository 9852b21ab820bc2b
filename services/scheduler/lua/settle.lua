-- A request of a tenant stopped being live, or its stored size changed (it ended and its
-- prompt was dropped, a result was kept): free its concurrency slot, charge its storage
-- at what it really holds, refund what admission took when nothing was stored at all.
-- KEYS[1] buckets (HASH), KEYS[2] live (ZSET), KEYS[3] storage charges (ZSET), KEYS[4] bytes
-- (HASH, as admit.lua keeps it)
-- ARGV: 1 now ms, 2 request id, 3 bytes stored now (-1 = none: drop the charge),
--       4 when the charge lapses (ms; 0 = keep its current lapse),
--       5 requests to refund, 6 tokens to refund
local id, bytes, lapse = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREM', KEYS[2], id)
local stored = redis.call('HMGET', KEYS[4], id, 'total', 'next', 'until')
local charged = stored[1]
if charged then
  local total = tonumber(stored[2] or '0')
  if bytes < 0 then
    redis.call('HDEL', KEYS[4], id)
    redis.call('HSET', KEYS[4], 'total', total - tonumber(charged))
    redis.call('ZREM', KEYS[3], id)
  else
    local charge = {id, bytes, 'total', total + bytes - tonumber(charged)}
    if lapse > 0 then
      redis.call('ZADD', KEYS[3], lapse, id)
      -- 'next' stays at or before the earliest lapse (admit.lua sweeps from it).
      if lapse < tonumber(stored[3] or '0') then
        charge[#charge + 1] = 'next'
        charge[#charge + 1] = lapse
      end
      local expires = tonumber(stored[4] or '0')
      if lapse > expires then
        expires = lapse + 3600000
        charge[#charge + 1] = 'until'
        charge[#charge + 1] = expires
        redis.call('PEXPIREAT', KEYS[3], expires)
        redis.call('PEXPIREAT', KEYS[4], expires)
      end
    end
    redis.call('HSET', KEYS[4], unpack(charge))
  end
end
if tonumber(ARGV[5]) > 0 then redis.call('HINCRBYFLOAT', KEYS[1], 'requests', ARGV[5]) end
if tonumber(ARGV[6]) > 0 then redis.call('HINCRBYFLOAT', KEYS[1], 'tokens', ARGV[6]) end
return 1
