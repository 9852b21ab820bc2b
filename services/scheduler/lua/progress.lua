-- Append output progress of a running request to its event streams, fenced by the lease.
-- KEYS[1] queue (declares the slot)
-- ARGV: 1 base, 2 now, 3 id, 4 lease token, 5.. the events, packed as emit_packed reads them
-- Returns the last event's id, or -1 when the lease was lost (stop streaming: someone else
-- owns it).
local id = ARGV[3]
local r = redis.call('HMGET', req_key(id), 'lease_token', 'quiet')
if r[1] ~= ARGV[4] then return -1 end
-- Output of a request whose record says its stream is empty (_lib.lua: 'quiet'): no more.
if r[2] == '1' then redis.call('HSET', req_key(id), 'quiet', '') end
return emit_packed(id, RUNNING, 5)
