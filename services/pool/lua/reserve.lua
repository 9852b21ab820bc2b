-- Take one slot of a model on an instance if both limits allow, shared by every Pool replica.
-- KEYS[1] instance slots, KEYS[2] model slots on the instance, KEYS[3] the new slot's hash
-- ARGV: 1 now ms, 2 lease ms, 3 slot id, 4 per-model limit, 5 per-instance limit (0 = none),
--       6.. slot hash field/value pairs
-- Returns 1 when granted, 0 when full.
local now, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
-- Leases of a replica that died run out here.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then return 0 end
local total = tonumber(ARGV[5])
if total > 0 and redis.call('ZCARD', KEYS[1]) >= total then return 0 end
redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
redis.call('ZADD', KEYS[2], now + lease, ARGV[3])
redis.call('HSET', KEYS[3], unpack(ARGV, 6))
redis.call('PEXPIRE', KEYS[3], lease)
return 1
