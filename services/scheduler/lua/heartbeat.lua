-- Extend a lease. The token fences it: a dispatcher that lost its lease learns so here.
-- KEYS[1] queue (declares the slot)
-- ARGV: 1 base, 2 now, 3 id, 4 lease token, 5 lease ms
-- Returns -1 when the lease is lost, else 1 when a cancel was requested, 0 otherwise.
local rk = req_key(ARGV[3])
if tonumber(redis.call('HGET', rk, 'state')) ~= RUNNING
    or redis.call('HGET', rk, 'lease_token') ~= ARGV[4] then
  return -1
end
redis.call('ZADD', K.leases, 'XX', NOW + tonumber(ARGV[5]), ARGV[3])
return tonumber(redis.call('HGET', rk, 'cancel') or '0')
