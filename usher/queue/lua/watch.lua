-- Open a watch in one round trip: the request (its prompt left out), its owners, its place
-- in the queue, and its own event stream after ARGV[4], all read at one instant, so the
-- snapshot and the replay agree and nothing written between them can be missed.
-- KEYS[1] queue (declares the slot)
-- ARGV: 1 base, 2 now, 3 id, 4 after (an event id; "0-0" for all)
-- Returns {hash as flat list without 'payload', owners, position (0 when not queued),
-- queue length (0 when not queued), events after ARGV[4], the id the watch stands at (its
-- last event's, or ARGV[4] when none follows it)}, or nil when there is no request.
local id = ARGV[3]
local rk = req_key(id)
local raw = redis.call('HGETALL', rk)
if #raw == 0 then return nil end
local fields = {}
for i = 1, #raw, 2 do
  if raw[i] ~= 'payload' then
    fields[#fields + 1] = raw[i]
    fields[#fields + 1] = raw[i + 1]
  end
end
local position, length = 0, 0
if tonumber(field_of(fields, 'state')) == QUEUED then
  local rank = redis.call('ZRANK', K.queue, field_of(fields, 'member') or '')
  if rank then
    position = rank + 1
    length = redis.call('ZCARD', K.queue)
  end
end
-- A quiet request's stream holds nothing (_lib.lua: 'quiet'): not read.
local events = {}
if field_of(fields, 'quiet') ~= '1' then
  events = redis.call('XRANGE', req_events_key(id), '(' .. ARGV[4], '+')
end
-- With no events after ARGV[4], none lies between it and the stream's end: the watch
-- stands at ARGV[4], or past the request's first event (_lib.lua: emit_first).
local tip = ARGV[4]
if tip == '0-0' then tip = field_of(fields, 'first_eid') or FIRST_EVENT_ID end
if #events > 0 then tip = events[#events][1] end
local owners = owners_of(id, field_of(fields, 'owner'), field_of(fields, 'shared'))
return {fields, owners, position, length, events, tip}
