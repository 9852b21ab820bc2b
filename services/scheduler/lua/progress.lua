-- Append output progress of a running request to its event streams, fenced by the lease.
-- KEYS[1] queue (declares the slot)
-- ARGV: 1 base, 2 now, 3 id, 4 lease token, 5 '1' when the caller hands what it wrote to a
-- reader in its own process (usher serve), 6.. the events, packed as emit_packed reads them
-- Returns the last event's id (with ARGV[5] '1': {the id of the request's event before
-- these, their ids in order}), or -1 when the lease was lost (stop streaming: someone else
-- owns it).
local id = ARGV[3]
if redis.call('HGET', req_key(id), 'lease_token') ~= ARGV[4] then return -1 end
if ARGV[5] ~= '1' then return emit_packed(id, RUNNING, 6) end
local after = last_event_id(id)
local written = {}
emit_packed(id, RUNNING, 6, written)
return {after, written}
