-- Shared by every script (prepended when loading, after the key header).
-- ARGV[1] is the model's key base, ARGV[2] the current time in ms.
local NOW = tonumber(ARGV[2])

local QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED, EXPIRED = 1, 2, 3, 4, 5, 6
local ROUTE_LOCAL, ROUTE_EXTERNAL = 1, 2
local FALLBACK_AFTER_TIMEOUT, FALLBACK_LOCAL_ONLY = 2, 3
local EVENTS_MAXLEN = 100000
local REQUEST_EVENTS_MAXLEN = 10000

local function fmt(x) return string.format('%.17g', x) end

local function is_terminal(state)
  return state == COMPLETED or state == FAILED or state == CANCELLED or state == EXPIRED
end

-- The value of ``name`` in a hash read with HGETALL (a flat field/value list), or nil: a
-- script that reads the whole hash anyway needs no HGET for one of its fields.
local function field_of(fields, name)
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return nil
end

-- Append one event to the request's own stream (for replay), then to the model's stream
-- (for live fan-out) carrying the request stream's entry id as 'eid', the resume token.
local function emit(id, kind, state, extra)
  local fields = {'type', kind, 'id', id, 'state', tostring(state), 'ts', tostring(NOW)}
  if extra then
    for i = 1, #extra do fields[#fields + 1] = extra[i] end
  end
  local eid = redis.call('XADD', req_events_key(id), 'MAXLEN', '~', REQUEST_EVENTS_MAXLEN, '*',
    unpack(fields))
  fields[#fields + 1] = 'eid'
  fields[#fields + 1] = eid
  redis.call('XADD', K.events, 'MAXLEN', '~', EVENTS_MAXLEN, '*', unpack(fields))
  return eid
end

-- The id a request's first event, its queuing, goes by. That event is written to the
-- model's stream alone (live watchers, badges): a watch shows a new request's state from
-- its record, and every later event of its own stream has an id above this one.
local FIRST_EVENT_ID = '0-1'
-- The id of the first event of a request written running at once (enqueue.lua: the claim
-- riding its enqueue took it from an empty queue), its 'running', written to the model's
-- stream alone too. Its record says so ('first_eid'): a watch from the start stands past it.
local RUNNING_AT_ONCE_EVENT_ID = '0-2'
-- The id of the end of a request written running at once that wrote nothing else before it
-- ended (complete.lua: a caller of the result alone), on the model's stream alone too: such
-- a request never has a stream of its own to write, expire or read.
local UNSTREAMED_END_EVENT_ID = '0-3'
-- A record's 'quiet' = '1': its request's own stream holds nothing, so a watch reads none
-- (one command fewer per watch). Set by enqueue.lua for a result-only request written
-- running at once (nothing but its end is written then, at UNSTREAMED_END_EVENT_ID); any
-- script writing to the stream of a request that may be quiet empties it ('' = absent) in
-- a write of the record it makes anyway: complete, progress, cancel, requeue, reap, retry
-- and finish (unless the end is the unstreamed one). A queued request is never quiet.

-- Write a request's first event (``eid``: one of the two ids above) to the model's stream.
local function emit_first(id, kind, state, eid, extra)
  local fields = {'type', kind, 'id', id, 'state', tostring(state), 'ts', tostring(NOW)}
  for _, value in ipairs(extra or {}) do fields[#fields + 1] = value end
  fields[#fields + 1] = 'eid'
  fields[#fields + 1] = eid
  redis.call('XADD', K.events, 'MAXLEN', '~', EVENTS_MAXLEN, '*', unpack(fields))
  return eid
end

-- Emit the events packed in ARGV from index ``first`` on, in order: each is its type, the
-- count of field/value items that follow, then those items. Returns the last event's id;
-- each one's is appended to ``written`` when given.
local function emit_packed(id, state, first, written)
  local i, eid = first, nil
  while i <= #ARGV do
    local kind, count = ARGV[i], tonumber(ARGV[i + 1])
    eid = emit(id, kind, state, {unpack(ARGV, i + 2, i + 1 + count)})
    if written then written[#written + 1] = eid end
    i = i + 2 + count
  end
  return eid
end

-- A request's owners: the caller who created it (its hash's 'owner'), until a deduplicated
-- submit shares it; from then on (and for a record written before 'owner' existed) its
-- owners set, which the first share fills with the creator too. Most requests are never
-- shared, so most have no set to write, expire or measure. ``owner`` and ``shared`` are
-- the two fields as read (nil or false when absent).
local function has_owners_set(owner, shared)
  return not owner or (shared and true or false)
end

local function is_owner(id, owner, shared, tenant)
  if not has_owners_set(owner, shared) then return owner == tenant end
  return redis.call('SISMEMBER', req_owners_key(id), tenant) == 1
end

local function owners_of(id, owner, shared)
  if not has_owners_set(owner, shared) then return {owner} end
  return redis.call('SMEMBERS', req_owners_key(id))
end

local function share_with(rk, id, owner, shared, tenant)
  if has_owners_set(owner, shared) then
    redis.call('SADD', req_owners_key(id), tenant)
  else
    redis.call('SADD', req_owners_key(id), owner, tenant)
    redis.call('HSET', rk, 'shared', 1)
  end
end

-- The id of the last entry of a request's own stream ("0-0": none): what a caller handing
-- the events it writes next to a reader in its own process says they follow.
local function last_event_id(id)
  local last = redis.call('XREVRANGE', req_events_key(id), '+', '-', 'COUNT', 1)
  if #last > 0 then return last[1][1] end
  return redis.call('HGET', req_key(id), 'first_eid') or '0-0'
end

-- Mark a request finished: state, reason, expiry of its keys, dedup entry released.
-- ``known`` (optional) spares what a caller has already done: ``fields``, more field/value
-- pairs for the request's hash; ``dedup``, its fingerprint as read (false: none);
-- ``counted``, the outcome already counted in the model's stats; ``running``, it was
-- running (so it is off the deadline index: claim took it off); ``owners_set``, false
-- when it has no owners set to expire (has_owners_set); ``unstreamed``, it has no stream of
-- its own (UNSTREAMED_END_EVENT_ID); ``quiet`` false, its record is known not to be quiet
-- (else the caller's next event ends its quiet: the flag is emptied).
local function finish(id, rk, state, reason, ttl, known)
  known = known or {}
  -- The lease is emptied, not deleted (one HSET, no HDEL: readers take '' for absent), and
  -- so is the prompt, which is not needed once a request ends (it may be megabytes of
  -- images): only the metadata and result stay for the result TTL. A failed request keeps
  -- it, as a dead letter may be retried.
  local fields = {'state', state, 'finished_ms', NOW, 'error', reason or '', 'lease_token', '',
    'lease_owner', ''}
  if state ~= FAILED then
    fields[#fields + 1] = 'payload'
    fields[#fields + 1] = ''
  end
  if known.quiet ~= false and not known.unstreamed then
    fields[#fields + 1] = 'quiet'
    fields[#fields + 1] = ''
  end
  for _, value in ipairs(known.fields or {}) do fields[#fields + 1] = value end
  redis.call('HSET', rk, unpack(fields))
  redis.call('ZREM', K.leases, id)
  if not known.running then redis.call('ZREM', K.deadlines, id) end
  local fp = known.dedup
  if fp == nil then fp = redis.call('HGET', rk, 'dedup') end
  if fp and fp ~= '' then
    local dk = dedup_key(fp)
    if redis.call('GET', dk) == id then redis.call('DEL', dk) end
  end
  if not known.counted then
    local counter = ({[COMPLETED] = 'completed', [FAILED] = 'failed', [CANCELLED] = 'cancelled',
      [EXPIRED] = 'expired'})[state]
    redis.call('HINCRBY', K.stats, counter, 1)
  end
  redis.call('EXPIRE', rk, ttl)
  if known.owners_set ~= false then redis.call('EXPIRE', req_owners_key(id), ttl) end
  if not known.unstreamed then redis.call('EXPIRE', req_events_key(id), ttl) end
end

-- Who owns a request that just ended, for the caller to settle the tenant's quotas (they
-- live in the tenant's hash slot, out of a per-model script's reach).
local function ended_entry(out, rk, id)
  local org, user = unpack(redis.call('HMGET', rk, 'org', 'user'))
  out[#out + 1] = id
  out[#out + 1] = org or ''
  out[#out + 1] = user or ''
end

-- Pop the head of ``source`` (the model's queue, or its external lane) and lease it, in one
-- step so nothing is lost between: claim.lua, and the claim riding an enqueue (enqueue.lua).
-- ``advance`` '1' moves the fair clock to the request's start tag; ``first``, a request to
-- claim ahead of the fair order ('' = none). Returns the claimed request hash as a flat
-- field/value list followed by 'claim_event_id' and the id of the event it wrote, or nil.
local function claim_next(source, lease_ms, owner, token, advance, first)
  -- An operator paused this model's dispatching (PauseQueue): nothing is claimed. The flag is
  -- read from its copy in the fairness hash, with the fair clock in one HMGET (a model not
  -- enqueued to since the copy existed has none yet: its config says).
  local fair = redis.call('HMGET', K.fairness, 'paused', 'vtime', 'config:lease_ms')
  local paused = fair[1] or redis.call('HGET', K.config, 'paused')
  if paused == '1' then return nil end
  -- The model's lease (UpdateQueueConfig), from its copy; lease_ms is the default.
  lease_ms = fair[3] or lease_ms
  -- The first request: its flow's answer freed this slot a moment ago and the dispatcher held
  -- it for the flow's next request (services/scheduler/anticipation.py). That flow had
  -- nothing queued and no more than its share of the slots in service, so serving it now
  -- gives it no more than its share: within start-time fair queuing's bound, which counts
  -- service, not the moment a slot turns. Its tags stay as enqueued. When it is no longer
  -- queued here (claimed elsewhere, cancelled), the fair head is taken instead.
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
      if advance == '1' then
        local vtime = tonumber(fair[2] or '0')
        local start = tonumber(get('start'))
        if start > vtime then redis.call('HSET', K.fairness, 'vtime', fmt(start)) end
      end
      local changes = {'attempts', tostring(tonumber(get('attempts') or '0') + 1),
        'state', tostring(RUNNING), 'started_ms', tostring(NOW), 'lease_token', token,
        'lease_owner', owner}
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
      redis.call('ZADD', K.leases, NOW + tonumber(lease_ms), id)
      redis.call('ZREM', K.deadlines, id)
      fields[#fields + 1] = 'claim_lease_ms'
      fields[#fields + 1] = lease_ms
      fields[#fields + 1] = 'claim_event_id'
      fields[#fields + 1] = emit(id, 'running', RUNNING, {'attempt', changes[2]})
      return fields
    end
    -- A member whose request is gone or no longer queued is stale: dropped, look again.
  end
  return nil
end
