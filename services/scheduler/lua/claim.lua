-- Pop the head of a queue and lease it to a dispatcher, in one step so nothing is lost between.
-- KEYS[1] the queue to claim from (the model's queue, or its external lane)
-- ARGV: 1 base, 2 now, 3 lease ms, 4 owner, 5 lease token, 6 advance virtual time (1/0),
--       7 a request to claim first, ahead of the fair order ('' = none)
-- Returns the claimed request hash as a flat field/value list, followed by 'claim_event_id'
-- and the id of the event it wrote (not a field of the hash), or nil when the queue is empty.
local source = KEYS[1]
-- An operator paused this model's dispatching (PauseQueue): nothing is claimed. The flag is
-- read from its copy in the fairness hash, with the fair clock in one HMGET (a model not
-- enqueued to since the copy existed has none yet: its config says).
local fair = redis.call('HMGET', K.fairness, 'paused', 'vtime')
local paused = fair[1] or redis.call('HGET', K.config, 'paused')
if paused == '1' then return nil end
-- The first request: its flow's answer freed this slot a moment ago and the dispatcher held
-- it for the flow's next request (services/scheduler/anticipation.py). That flow had
-- nothing queued and no more than its share of the slots in service, so serving it now
-- gives it no more than its share: within start-time fair queuing's bound, which counts
-- service, not the moment a slot turns. Its tags stay as enqueued. When it is no longer
-- queued here (claimed elsewhere, cancelled), the fair head is taken instead.
local first = ARGV[7] or ''
for _ = 1, 100 do
  local head = {}
  if first ~= '' then
    local member = redis.call('HGET', req_key(first), 'member')
    if member and redis.call('ZREM', source, member) == 1 then head = {member} end
    first = ''
  end
  if #head == 0 then head = redis.call('ZPOPMIN', source) end
  if #head == 0 then return nil end
  local id = string.sub(head[1], 18)
  local rk = req_key(id)
  -- The hash is read once: the checks below use it, and it is the reply (with what this
  -- claim changes written into it).
  local fields = redis.call('HGETALL', rk)
  local at = {}
  for i = 1, #fields, 2 do at[fields[i]] = i + 1 end
  local function get(name) return at[name] and fields[at[name]] end
  if tonumber(get('state')) == QUEUED then
    if ARGV[6] == '1' then
      local vtime = tonumber(fair[2] or '0')
      local start = tonumber(get('start'))
      if start > vtime then redis.call('HSET', K.fairness, 'vtime', fmt(start)) end
    end
    local changes = {'attempts', tostring(tonumber(get('attempts') or '0') + 1),
      'state', tostring(RUNNING), 'started_ms', tostring(NOW), 'lease_token', ARGV[5],
      'lease_owner', ARGV[4]}
    redis.call('HSET', rk, unpack(changes))
    for i = 1, #changes, 2 do
      local name, value = changes[i], changes[i + 1]
      if at[name] then
        fields[at[name]] = value
      else
        fields[#fields + 1] = name
        fields[#fields + 1] = value
      end
    end
    redis.call('ZADD', K.leases, NOW + tonumber(ARGV[3]), id)
    redis.call('ZREM', K.deadlines, id)
    fields[#fields + 1] = 'claim_event_id'
    fields[#fields + 1] = emit(id, 'running', RUNNING, {'attempt', changes[2]})
    return fields
  end
  -- A member whose request is gone or no longer queued is stale: dropped, look again.
end
return nil
