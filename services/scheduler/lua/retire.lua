-- A model that left the fleet: when nothing of it waits, runs or is dead-lettered, its keys
-- expire after the given time (a return to the fleet before then revives them: enqueue
-- persists them when it finds the marker).
-- KEYS[1] queue (declares the slot)
-- ARGV: 1 base, 2 now, 3 seconds until its keys expire
-- Returns 1 when the model was retired, 0 when it still has work.
for _, lane in ipairs({K.queue, K.leases, K.external, K.deadlines, K.dead_letters, K.retrying}) do
  if redis.call('ZCARD', lane) > 0 then return 0 end
end
local ttl = tonumber(ARGV[3])
for _, key in pairs(K) do redis.call('EXPIRE', key, ttl) end
redis.call('SET', RETIRED, '1', 'EX', ttl)
return 1
