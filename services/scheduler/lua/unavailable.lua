-- No local instance serves the model: hand its queued requests that may leave the local
-- fleet (fallback policy AFTER_TIMEOUT) to the external lane now, keeping their scores,
-- instead of letting them wait out their queue timeout.
-- KEYS[1] queue (declares the slot)
-- ARGV: 1 base, 2 now, 3 batch limit
-- Returns how many were handed over.
local moved = 0
for _, member in ipairs(redis.call('ZRANGE', K.queue, 0, tonumber(ARGV[3]) - 1)) do
  local id = string.sub(member, 18)
  local rk = req_key(id)
  if tonumber(redis.call('HGET', rk, 'fallback') or '0') == FALLBACK_AFTER_TIMEOUT
      and tonumber(redis.call('HGET', rk, 'state')) == QUEUED then
    redis.call('ZREM', K.queue, member)
    redis.call('ZADD', K.external, redis.call('HGET', rk, 'score'), member)
    redis.call('HSET', rk, 'route', ROUTE_EXTERNAL, 'route_reason', 'unavailable')
    emit(id, 'fallback', QUEUED, {'route', 'external', 'reason', 'unavailable'})
    moved = moved + 1
  end
end
return moved
