-- Give a leased request back to its original place in the queue (the dispatcher could not
-- run it: no instance free, a failed attempt, or it is shutting down), fenced by the lease
-- token. With a backoff it waits out of line (K.retrying) until the reaper puts it back:
-- QUEUED to its watchers, holding no lease and no dispatcher.
-- KEYS[1] queue (declares the slot)
-- ARGV: 1 base, 2 now, 3 id, 4 lease token, 5 count the attempt (1/0), 6 reason,
--       7 backoff ms (0 = back in line at once)
-- Returns 1, or -1 when the lease was lost.
local id = ARGV[3]
local rk = req_key(id)
if tonumber(redis.call('HGET', rk, 'state')) ~= RUNNING
    or redis.call('HGET', rk, 'lease_token') ~= ARGV[4] then
  return -1
end
if ARGV[5] ~= '1' then redis.call('HINCRBY', rk, 'attempts', -1) end
redis.call('HSET', rk, 'state', QUEUED, 'quiet', '')
redis.call('HDEL', rk, 'lease_token', 'lease_owner')
redis.call('ZREM', K.leases, id)
local backoff = tonumber(ARGV[7] or '0')
local fields = {'error', ARGV[6]}
if backoff > 0 then
  local retry_at = NOW + backoff
  redis.call('HSET', rk, 'retry_at_ms', retry_at)
  redis.call('ZADD', K.retrying, retry_at, id)
  fields[#fields + 1] = 'retry_at_ms'
  fields[#fields + 1] = tostring(retry_at)
else
  local lane = K.queue
  if tonumber(redis.call('HGET', rk, 'route')) == ROUTE_EXTERNAL then lane = K.external end
  redis.call('ZADD', lane, redis.call('HGET', rk, 'score'), redis.call('HGET', rk, 'member'))
end
local expires = tonumber(redis.call('HGET', rk, 'expires_ms') or '0')
if expires > 0 then redis.call('ZADD', K.deadlines, expires, id) end
emit(id, 'requeued', QUEUED, fields)
return 1
