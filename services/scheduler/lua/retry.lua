-- Put a dead-lettered request back at its original place in the queue, attempts reset.
-- KEYS[1] queue (declares the slot)
-- ARGV: 1 base, 2 now, 3 id
-- Returns notfound | not_dead | retried.
local id = ARGV[3]
local rk = req_key(id)
if redis.call('EXISTS', rk) == 0 then return 'notfound' end
if not redis.call('ZSCORE', K.dead_letters, id) then return 'not_dead' end
redis.call('ZREM', K.dead_letters, id)
redis.call('HSET', rk, 'state', QUEUED, 'attempts', 0, 'error', '', 'route', ROUTE_LOCAL,
  'quiet', '')
redis.call('HDEL', rk, 'finished_ms', 'cancel', 'cancel_reason')
redis.call('PERSIST', rk)
redis.call('PERSIST', req_owners_key(id))
redis.call('PERSIST', req_events_key(id))
local expires = NOW + tonumber(redis.call('HGET', rk, 'queue_timeout_ms'))
redis.call('HSET', rk, 'expires_ms', expires)
redis.call('ZADD', K.queue, redis.call('HGET', rk, 'score'), redis.call('HGET', rk, 'member'))
redis.call('ZADD', K.deadlines, expires, id)
emit(id, 'requeued', QUEUED, {'error', 'retried from the dead-letter list'})
return 'retried'
