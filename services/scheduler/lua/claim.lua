-- Pop the head of a queue and lease it to a dispatcher, in one step so nothing is lost between.
-- KEYS[1] the queue to claim from (the model's queue, or its external lane)
-- ARGV: 1 base, 2 now, 3 lease ms, 4 owner, 5 lease token, 6 advance virtual time (1/0)
-- Returns the claimed request hash as a flat field/value list, or nil when the queue is empty.
local source = KEYS[1]
-- An operator paused this model's dispatching (PauseQueue): nothing is claimed.
if redis.call('HGET', K.config, 'paused') == '1' then return nil end
for _ = 1, 100 do
  local head = redis.call('ZRANGE', source, 0, 0)
  if #head == 0 then return nil end
  local member = head[1]
  redis.call('ZREM', source, member)
  local id = string.sub(member, 18)
  local rk = req_key(id)
  if tonumber(redis.call('HGET', rk, 'state')) == QUEUED then
    if ARGV[6] == '1' then
      local vtime = tonumber(redis.call('HGET', K.fairness, 'vtime') or '0')
      local start = tonumber(redis.call('HGET', rk, 'start'))
      if start > vtime then redis.call('HSET', K.fairness, 'vtime', fmt(start)) end
    end
    local attempts = redis.call('HINCRBY', rk, 'attempts', 1)
    redis.call('HSET', rk, 'state', RUNNING, 'started_ms', NOW, 'lease_token', ARGV[5],
      'lease_owner', ARGV[4])
    redis.call('ZADD', K.leases, NOW + tonumber(ARGV[3]), id)
    redis.call('ZREM', K.deadlines, id)
    emit(id, 'running', RUNNING, {'attempt', tostring(attempts)})
    return redis.call('HGETALL', rk)
  end
  -- A member whose request is gone or no longer queued is stale: drop it and look again.
end
return nil
