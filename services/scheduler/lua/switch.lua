-- Move a queued request to the external lane at the caller's wish, keeping its score.
-- KEYS[1] queue (declares the slot)
-- ARGV: 1 base, 2 now, 3 id, 4 caller tenant, 5 is admin (1/0), 6 external wait ms
-- Returns notfound | denied | local_only | not_queued | already | switched.
local id = ARGV[3]
local rk = req_key(id)
local r = redis.call('HMGET', rk, 'state', 'owner', 'shared')
local state = tonumber(r[1])
if not state then return 'notfound' end
if not is_owner(id, r[2], r[3], ARGV[4]) and ARGV[5] ~= '1' then
  return 'denied'
end
if tonumber(redis.call('HGET', rk, 'fallback') or '0') == FALLBACK_LOCAL_ONLY then return 'local_only' end
if state ~= QUEUED then return 'not_queued' end
if tonumber(redis.call('HGET', rk, 'route')) == ROUTE_EXTERNAL then return 'already' end
local member = redis.call('HGET', rk, 'member')
redis.call('ZREM', K.queue, member)
-- One waiting out a retry backoff goes at once: the external provider is another server.
redis.call('ZREM', K.retrying, id)
redis.call('HDEL', rk, 'retry_at_ms')
redis.call('ZADD', K.external, redis.call('HGET', rk, 'score'), member)
-- The external lane gets its own wait limit, so a request never waits there forever.
local expires = NOW + tonumber(ARGV[6])
local deadline = tonumber(redis.call('HGET', rk, 'deadline_ms') or '0')
if deadline > 0 and deadline < expires then expires = deadline end
redis.call('HSET', rk, 'route', ROUTE_EXTERNAL, 'expires_ms', expires, 'route_reason', 'switched')
redis.call('ZADD', K.deadlines, expires, id)
emit(id, 'fallback', QUEUED, {'route', 'external', 'reason', 'switched by the user'})
return 'switched'
