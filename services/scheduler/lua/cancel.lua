-- Cancel a request for one caller.
-- KEYS[1] queue (declares the slot)
-- ARGV: 1 base, 2 now, 3 id, 4 caller tenant, 5 is admin (1/0), 6 reason, 7 ttl s
-- Returns notfound | denied | finished | detached | cancelled | cancel_requested.
local id, caller = ARGV[3], ARGV[4]
local rk = req_key(id)
local r = redis.call('HMGET', rk, 'state', 'owner', 'shared')
local state = tonumber(r[1])
if not state then return 'notfound' end
local owner = is_owner(id, r[2], r[3], caller)
if not owner and ARGV[5] ~= '1' then return 'denied' end
if is_terminal(state) then return 'finished' end
-- A deduplicated request shared by several callers goes on for the others.
if owner and has_owners_set(r[2], r[3]) and redis.call('SCARD', req_owners_key(id)) > 1 then
  redis.call('SREM', req_owners_key(id), caller)
  return 'detached'
end
if state == QUEUED then
  redis.call('ZREM', K.queue, redis.call('HGET', rk, 'member'))
  redis.call('ZREM', K.external, redis.call('HGET', rk, 'member'))
  redis.call('ZREM', K.retrying, id)
  redis.call('HDEL', rk, 'retry_at_ms')
  finish(id, rk, CANCELLED, ARGV[6], tonumber(ARGV[7]))
  emit(id, 'cancelled', CANCELLED, {'error', ARGV[6]})
  return 'cancelled'
end
-- RUNNING: the owning dispatcher sees the flag on its next heartbeat and stops the work.
redis.call('HSET', rk, 'cancel', 1, 'cancel_reason', ARGV[6], 'quiet', '')
emit(id, 'cancel_requested', state, {'error', ARGV[6]})
return 'cancel_requested'
