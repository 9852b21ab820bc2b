-- Take one slot of a model on an instance if both limits allow, shared by every Pool replica.
-- KEYS[1] instance slots, KEYS[2] model slots on the instance
-- ARGV: 1 now ms, 2 lease ms, 3 slot id, 4 per-model limit, 5 per-instance limit (0 = none)
-- Returns {granted (1 or 0), the model's slots held now, the instance's slots held now
-- (-1 when its limit is off and they were not counted)}.
local now, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
local limit, total = tonumber(ARGV[4]), tonumber(ARGV[5])
-- Leases of a replica that died run out here. A set below its limit needs no pruning to
-- decide, so it is pruned when it reaches the limit, and now and then (a set with no
-- limit would otherwise keep a dead replica's entries for ever).
local sweep = now % 32 == 0
local function held(key, cap)
  local n = redis.call('ZCARD', key)
  if (cap > 0 and n >= cap) or sweep then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    n = redis.call('ZCARD', key)
  end
  return n
end
local model_held = held(KEYS[2], limit)
if model_held >= limit then return {0, model_held, -1} end
local all = -1
if total > 0 then
  all = held(KEYS[1], total)
  if all >= total then return {0, model_held, all} end
elseif sweep then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
redis.call('ZADD', KEYS[2], now + lease, ARGV[3])
return {1, model_held + 1, all >= 0 and all + 1 or -1}
