-- A request of a tenant stopped being live, or its stored size changed (it ended and its
-- prompt was dropped, a result was kept): free its concurrency slot, charge its storage
-- at what it really holds, refund what admission took when nothing was stored at all.
-- KEYS[1] buckets (HASH), KEYS[2] live (ZSET), KEYS[3] storage charges (ZSET), KEYS[4] bytes
-- ARGV: 1 now ms, 2 request id, 3 bytes stored now (-1 = none: drop the charge),
--       4 when the charge lapses (ms; 0 = keep its current lapse),
--       5 requests to refund, 6 tokens to refund
local id, bytes, lapse = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREM', KEYS[2], id)
local charged = redis.call('HGET', KEYS[4], id)
if bytes < 0 then
  if charged then
    redis.call('HINCRBY', KEYS[4], 'total', -tonumber(charged))
    redis.call('HDEL', KEYS[4], id)
    redis.call('ZREM', KEYS[3], id)
  end
elseif charged then
  redis.call('HINCRBY', KEYS[4], 'total', bytes - tonumber(charged))
  redis.call('HSET', KEYS[4], id, bytes)
  if lapse > 0 then
    redis.call('ZADD', KEYS[3], lapse, id)
    local last = redis.call('ZRANGE', KEYS[3], -1, -1, 'WITHSCORES')
    redis.call('PEXPIREAT', KEYS[3], last[2])
    redis.call('PEXPIREAT', KEYS[4], last[2])
  end
end
if tonumber(ARGV[5]) > 0 then redis.call('HINCRBYFLOAT', KEYS[1], 'requests', ARGV[5]) end
if tonumber(ARGV[6]) > 0 then redis.call('HINCRBYFLOAT', KEYS[1], 'tokens', ARGV[6]) end
return 1
