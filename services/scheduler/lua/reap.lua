-- Return requests whose lease expired, or whose retry backoff ended, to their original
-- place, and end (or hand to the external provider) requests whose queue timeout or
-- deadline passed.
-- KEYS[1] queue (declares the slot)
-- ARGV: 1 base, 2 now, 3 batch limit, 4 ttl s, 5 dead-letter retention ms (0 = for ever)
-- Returns {requeued, dead-lettered, expired, handed to external, {id, org, user, ...} of
-- the requests that ended, dead letters deleted, back in line after their backoff}.
local limit, ttl, retention = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5] or '0')
local requeued, dead, expired, external, pruned, back = 0, 0, 0, 0, 0, 0
local ended = {}

for _, id in ipairs(redis.call('ZRANGE', K.leases, '-inf', NOW, 'BYSCORE', 'LIMIT', 0, limit)) do
  local rk = req_key(id)
  redis.call('ZREM', K.leases, id)
  if tonumber(redis.call('HGET', rk, 'state')) == RUNNING then
    local attempts = tonumber(redis.call('HGET', rk, 'attempts'))
    local max_attempts = tonumber(redis.call('HGET', rk, 'max_attempts'))
    if redis.call('HGET', rk, 'cancel') == '1' then
      finish(id, rk, CANCELLED, redis.call('HGET', rk, 'cancel_reason') or 'cancelled', ttl)
      emit(id, 'cancelled', CANCELLED)
      ended_entry(ended, rk, id)
    elseif attempts >= max_attempts then
      local reason = 'lease expired on all ' .. attempts .. ' attempts'
      finish(id, rk, FAILED, reason, ttl)
      redis.call('ZADD', K.dead_letters, NOW, id)
      redis.call('PERSIST', rk)
      redis.call('PERSIST', req_owners_key(id))
      redis.call('PERSIST', req_events_key(id))
      emit(id, 'failed', FAILED, {'error', reason})
      dead = dead + 1
      ended_entry(ended, rk, id)
    else
      redis.call('HSET', rk, 'state', QUEUED, 'quiet', '')
      redis.call('HDEL', rk, 'lease_token', 'lease_owner')
      local lane = K.queue
      if tonumber(redis.call('HGET', rk, 'route')) == ROUTE_EXTERNAL then lane = K.external end
      redis.call('ZADD', lane, redis.call('HGET', rk, 'score'), redis.call('HGET', rk, 'member'))
      local expires = tonumber(redis.call('HGET', rk, 'expires_ms') or '0')
      if expires > 0 then redis.call('ZADD', K.deadlines, expires, id) end
      emit(id, 'requeued', QUEUED, {'attempt', tostring(attempts)})
      requeued = requeued + 1
    end
  end
end

for _, id in ipairs(redis.call('ZRANGE', K.retrying, '-inf', NOW, 'BYSCORE', 'LIMIT', 0, limit)) do
  local rk = req_key(id)
  redis.call('ZREM', K.retrying, id)
  if tonumber(redis.call('HGET', rk, 'state')) == QUEUED and redis.call('HDEL', rk, 'retry_at_ms') == 1 then
    local lane = K.queue
    if tonumber(redis.call('HGET', rk, 'route')) == ROUTE_EXTERNAL then lane = K.external end
    redis.call('ZADD', lane, redis.call('HGET', rk, 'score'), redis.call('HGET', rk, 'member'))
    emit(id, 'queued', QUEUED, {'retried', '1'})
    back = back + 1
  end
end

for _, id in ipairs(redis.call('ZRANGE', K.deadlines, '-inf', NOW, 'BYSCORE', 'LIMIT', 0, limit)) do
  local rk = req_key(id)
  redis.call('ZREM', K.deadlines, id)
  if tonumber(redis.call('HGET', rk, 'state')) == QUEUED then
    -- Its backoff may still run: it ends (or goes external) from there too.
    redis.call('ZREM', K.retrying, id)
    redis.call('HDEL', rk, 'retry_at_ms')
    local member = redis.call('HGET', rk, 'member')
    local deadline = tonumber(redis.call('HGET', rk, 'deadline_ms') or '0')
    local fallback = tonumber(redis.call('HGET', rk, 'fallback') or '0')
    redis.call('ZREM', K.queue, member)
    if fallback == FALLBACK_AFTER_TIMEOUT and not (deadline > 0 and deadline <= NOW)
        and tonumber(redis.call('HGET', rk, 'route')) ~= ROUTE_EXTERNAL then
      -- The external lane gets one more queue timeout, so nothing waits there forever.
      local expires = NOW + tonumber(redis.call('HGET', rk, 'queue_timeout_ms'))
      if deadline > 0 and deadline < expires then expires = deadline end
      redis.call('HSET', rk, 'route', ROUTE_EXTERNAL, 'expires_ms', expires, 'route_reason', 'timeout')
      redis.call('ZADD', K.external, redis.call('HGET', rk, 'score'), member)
      redis.call('ZADD', K.deadlines, expires, id)
      emit(id, 'fallback', QUEUED, {'route', 'external'})
      external = external + 1
    else
      redis.call('ZREM', K.external, member)
      local reason = 'queue timeout passed'
      if deadline > 0 and deadline <= NOW then reason = 'deadline passed' end
      finish(id, rk, EXPIRED, reason, ttl)
      emit(id, 'expired', EXPIRED, {'error', reason})
      expired = expired + 1
      ended_entry(ended, rk, id)
    end
  end
end
-- Dead letters an operator left alone for the retention are deleted with their data (a
-- dead letter's keys do not expire: it waits to be retried).
if retention > 0 then
  local old = redis.call('ZRANGE', K.dead_letters, '-inf', NOW - retention, 'BYSCORE', 'LIMIT', 0, limit)
  for _, id in ipairs(old) do
    redis.call('ZREM', K.dead_letters, id)
    if tonumber(redis.call('HGET', req_key(id), 'state')) == FAILED then
      redis.call('DEL', req_key(id), req_owners_key(id), req_events_key(id))
    end
    pruned = pruned + 1
  end
end
return {requeued, dead, expired, external, ended, pruned, back}
