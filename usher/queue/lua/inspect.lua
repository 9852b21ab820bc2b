-- Read one request with its owners and current place in the queue, in one round trip.
-- KEYS[1] queue (declares the slot)
-- ARGV: 1 base, 2 now, 3 id
-- Returns {hash as flat list, owners, position (0 when not queued), queue length}.
local id = ARGV[3]
local rk = req_key(id)
local fields = redis.call('HGETALL', rk)
if #fields == 0 then return nil end
local position = 0
if tonumber(field_of(fields, 'state')) == QUEUED then
  local rank = redis.call('ZRANK', K.queue, field_of(fields, 'member'))
  if rank then position = rank + 1 end
end
local owners = owners_of(id, field_of(fields, 'owner'), field_of(fields, 'shared'))
return {fields, owners, position, redis.call('ZCARD', K.queue)}
