-- Extend a slot's lease while its request runs.
-- KEYS[1] instance slots, KEYS[2] model slots
-- ARGV: 1 now ms, 2 lease ms, 3 slot id
-- Returns 1, or 0 when the slot is gone (expired and possibly given to someone else).
local expiry = tonumber(ARGV[1]) + tonumber(ARGV[2])
if redis.call('ZADD', KEYS[2], 'XX', 'CH', expiry, ARGV[3]) == 0
    and not redis.call('ZSCORE', KEYS[2], ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[3])
return 1
