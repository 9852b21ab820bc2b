-- Queue a request atomically: idempotency, dedup, size limit, fair tags, event.
-- KEYS[1] queue (declares the slot)
-- ARGV: 1 base, 2 now, 3 id, 4 tenant, 5 flow, 6 weight, 7 cost, 8 class, 9 priority lead,
--       10 default max queue size, 11 fingerprint ('' = no dedup), 12 idempotency key ('' = none),
--       13 idempotency ttl s, 14 queue timeout ms (0 = the model's), 15 default max attempts,
--       16 default queue timeout ms, 17 created ms, 18 deadline ms (0 = none),
--       19 time constant (ms) of flows' arrival rates, 20 lease ms of a claim riding this
--       enqueue ('' = none), 21 its owner, 22 its lease token, 23.. field/value pairs of the
--       request hash
-- Returns {status, id, position, queue length}; status is queued | exists | replayed | dedup | full
-- | refused (its admission, just before, said no);
-- 'queued' adds the start tag, max attempts and queue timeout (ms) it was given, 1 when
-- the model's keys were expiring (retire.lua) and are kept again (else 0), and the fair
-- clock and the count of running requests (the caller's ETA needs them: no read of its own).
-- With a claim riding, the model's next request in fair order is claimed after the enqueue
-- (whatever its status) and the reply ends with the claim's (_lib.lua: claim_next; false
-- when nothing was claimed). A request queued to an empty queue is claimed as it is written:
-- one record write, no queue or deadline entry made only to be taken off again, and its
-- 'running' event alone, on the model's stream alone (_lib.lua: RUNNING_AT_ONCE_EVENT_ID).
local id, tenant, flow = ARGV[3], ARGV[4], ARGV[5]
local weight, cost, class, lead = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]),
  tonumber(ARGV[9])
local fingerprint, idem = ARGV[11], ARGV[12]
local rk = req_key(id)
local claim_ms, claim_owner, claim_token = ARGV[20], ARGV[21], ARGV[22]
local claiming = claim_ms ~= ''
-- The fairness hash's 'config' once the config's copies are made; a new one for every field
-- added to them, so the copies made before it are made again ('2': the lease).
local COPIES_VERSION = '2'

local function position_of(rid)
  local member = redis.call('HGET', req_key(rid), 'member')
  local rank = member and redis.call('ZRANK', K.queue, member)
  return rank and (rank + 1) or 0
end

-- The reply, and (for a request written running at once) what its claim took, as
-- claim_next's reply.
local function enqueue()
  -- One EXISTS for the request, the model's retirement marker and a refusal by the admission
  -- sent just before in the same round trip (admit.lua): on the common path none exists.
  local existing = redis.call('EXISTS', rk, RETIRED, refused_key(id))
  if existing > 0 and redis.call('DEL', refused_key(id)) == 1 then
    return {'refused', id, 0, 0}
  end
  if idem ~= '' then
    local earlier = redis.call('GET', idem_key(tenant, idem))
    -- Replay only what this caller owns: the key names the caller, and the request's owners
    -- say so too (a key that somehow points elsewhere is never a way into another's result).
    local found = earlier and redis.call('HMGET', req_key(earlier), 'state', 'owner', 'shared')
    if found and found[1] and is_owner(earlier, found[2], found[3], tenant) then
      return {'replayed', earlier, position_of(earlier), redis.call('ZCARD', K.queue)}
    end
  end
  if existing > 0 and redis.call('EXISTS', rk) == 1 then
    return {'exists', id, position_of(id), redis.call('ZCARD', K.queue)}
  end
  if fingerprint ~= '' then
    local live = redis.call('GET', dedup_key(fingerprint))
    if live then
      local lk = req_key(live)
      local found = redis.call('HMGET', lk, 'state', 'owner', 'shared')
      local state = tonumber(found[1])
      if state == QUEUED or state == RUNNING then
        share_with(lk, live, found[2], found[3], tenant)
        redis.call('HINCRBY', K.stats, 'deduplicated', 1)
        if idem ~= '' then redis.call('SET', idem_key(tenant, idem), live, 'EX', ARGV[13]) end
        return {'dedup', live, position_of(live), redis.call('ZCARD', K.queue)}
      end
    end
  end

  -- The model had left the fleet and its keys were expiring: it is back, they stay.
  local revived = 0
  if existing > 0 and redis.call('EXISTS', RETIRED) == 1 then
    for _, key in pairs(K) do redis.call('PERSIST', key) end
    redis.call('DEL', RETIRED)
    revived = 1
  end

  local length = redis.call('ZCARD', K.queue)
  -- The fairness hash is read once and written once below: this runs per request. It holds
  -- copies of the config's fields the scripts read ('config' = COPIES_VERSION once they are
  -- all there: an absent copy is then an unset field), kept by every change of the config
  -- (store.py: update_config); until then the config itself is read, and the copies made.
  local fair = redis.call('HMGET', K.fairness, 'vtime', 'flow:' .. flow, 'act:' .. flow,
    'act_since', 'seq', 'paused', 'config', 'config:max_queue_size', 'config:max_attempts',
    'config:queue_timeout_ms', 'config:lease_ms')
  local copied = fair[7] == COPIES_VERSION and fair[6] ~= false
  local config
  if copied then
    config = {fair[8], fair[9], fair[10], fair[6], fair[11]}
  else
    config = redis.call('HMGET', K.config, 'max_queue_size', 'max_attempts', 'queue_timeout_ms',
      'paused', 'lease_ms')
  end
  local limit = tonumber(config[1] or ARGV[10])
  if length >= limit then
    redis.call('HINCRBY', K.stats, 'rejected', 1)
    return {'full', '', 0, length}
  end

  -- Start-time fair queuing (usher/queue/fairness.py: enqueue_tags).
  local vtime = tonumber(fair[1] or '0')
  local flow_finish = tonumber(fair[2] or '0')
  local start = math.max(vtime, flow_finish)
  local score = start + lead * (class - 1)

  -- How often this flow sends, for ETAs: other flows' expected arrivals are what overtakes a
  -- queued request (eta.py: decayed_count, activity_from_record). "count at_ms cost weight":
  -- each arrival weighs exp(-age / tau); cost is a moving average of its requests' costs.
  local tau = tonumber(ARGV[19])
  local count, typical, previous = 1, cost, nil
  local act = fair[3]
  if act then
    local c, at, avg = string.match(act, '^(%S+) (%S+) (%S+)')
    previous = tonumber(at)
    count = tonumber(c) * math.exp(-math.max(0, NOW - previous) / tau) + 1
    typical = tonumber(avg) + 0.2 * (cost - tonumber(avg))
  end
  -- The arrival sequence orders equal scores first come, first served. It lives in the
  -- fairness hash (written with the tags); a model queued before it moved there goes on
  -- from its old counter.
  local seq = tonumber(fair[5] or redis.call('GET', K.sequence) or '0') + 1
  local fairness = {'flow:' .. flow, fmt(start + cost / weight), 'last:' .. flow, fmt(start),
    'act:' .. flow, string.format('%.6g %d %.6g %s', count, NOW, typical, fmt(weight)),
    'seq', string.format('%d', seq)}
  if not fair[4] then
    fairness[#fairness + 1] = 'act_since'
    fairness[#fairness + 1] = NOW
  end
  -- claim.lua reads the paused flag from this hash: a copy of the config's, kept here by
  -- every change of it (store.py: update_config) and set here when missing.
  local paused = config[4] or '0'
  if fair[6] ~= paused then
    fairness[#fairness + 1] = 'paused'
    fairness[#fairness + 1] = paused
  end
  -- A claim riding an enqueue to an empty queue takes this request (claim_next would pop it
  -- at once): it is written running, and the fair clock moves to its start tag here.
  local at_once = claiming and length == 0 and paused ~= '1'
  if at_once and start > vtime then
    fairness[#fairness + 1] = 'vtime'
    fairness[#fairness + 1] = fmt(start)
  end
  if not copied then
    local names = {'config:max_queue_size', 'config:max_attempts', 'config:queue_timeout_ms',
      false, 'config:lease_ms'}
    for i, name in ipairs(names) do
      if name and config[i] then
        fairness[#fairness + 1] = name
        fairness[#fairness + 1] = config[i]
      end
    end
    fairness[#fairness + 1] = 'config'
    fairness[#fairness + 1] = COPIES_VERSION
  end
  redis.call('HSET', K.fairness, unpack(fairness))
  -- The flows index picks flows by when they last sent, to within minutes (eta.py:
  -- ACTIVE_FLOW_SECONDS), so a flow's entry is written at its first arrival in each second,
  -- not at every one: it lags the flow's last arrival by less than a second.
  if not previous or math.floor(previous / 1000) ~= math.floor(NOW / 1000) then
    redis.call('ZADD', K.flows, NOW, flow)
  end
  -- Flows silent for five time constants are forgotten, a batch every 16 arrivals.
  if seq % 16 == 0 then
    local old = redis.call('ZRANGEBYSCORE', K.flows, '-inf', NOW - 5 * tau, 'LIMIT', 0, 64)
    if #old > 0 then
      local fields = {}
      for i, name in ipairs(old) do fields[i] = 'act:' .. name end
      redis.call('ZREM', K.flows, unpack(old))
      redis.call('HDEL', K.fairness, unpack(fields))
    end
  end

  local member = string.format('%016d:%s', seq, id)
  local max_attempts = config[2] or ARGV[15]
  local timeout = tonumber(ARGV[14])
  if timeout <= 0 then
    timeout = tonumber(config[3] or ARGV[16])
  end
  local expires = tonumber(ARGV[17]) + timeout
  local deadline = tonumber(ARGV[18])
  if deadline > 0 and deadline < expires then expires = deadline end

  local fields = {unpack(ARGV, 23)}
  for _, value in ipairs({'state', at_once and RUNNING or QUEUED, 'member', member,
      'score', fmt(score), 'start', fmt(start), 'cost', fmt(cost), 'weight', fmt(weight),
      'flow', flow, 'attempts', at_once and 1 or 0, 'max_attempts', max_attempts,
      'expires_ms', expires, 'dedup', fingerprint, 'queue_timeout_ms', timeout,
      'created_ms', ARGV[17], 'deadline_ms', deadline, 'owner', tenant}) do
    fields[#fields + 1] = value
  end
  if at_once then
    for _, value in ipairs({'started_ms', NOW, 'lease_token', claim_token,
        'lease_owner', claim_owner, 'first_eid', RUNNING_AT_ONCE_EVENT_ID}) do
      fields[#fields + 1] = value
    end
    -- Its result read alone, nothing is written to its own stream until it ends (_lib.lua:
    -- 'quiet').
    if field_of(fields, 'result_only') == '1' then
      fields[#fields + 1] = 'quiet'
      fields[#fields + 1] = '1'
    end
  end
  redis.call('HSET', rk, unpack(fields))
  -- The running count the caller's ETA takes is the one this request joins; one written
  -- running at once holds its slot already (a wait of none: no count read).
  local running = at_once and 0 or redis.call('ZCARD', K.leases)
  if at_once then
    claim_ms = config[5] or claim_ms  -- the model's lease, where its config sets one
    redis.call('ZADD', K.leases, NOW + tonumber(claim_ms), id)
  else
    redis.call('ZADD', K.queue, fmt(score), member)
    redis.call('ZADD', K.deadlines, expires, id)
  end
  if fingerprint ~= '' then redis.call('SET', dedup_key(fingerprint), id) end
  if idem ~= '' then redis.call('SET', idem_key(tenant, idem), id, 'EX', ARGV[13]) end
  local claimed = nil
  if at_once then
    -- No 'queued' event: nobody saw it queued (this script is atomic), and its 'running'
    -- tells the model's watchers (positions, badges) as much.
    -- The reply claim_next's HGETALL would have read: values as HSET stored them.
    for i, value in ipairs(fields) do
      if type(value) == 'number' then fields[i] = fmt(value) end
    end
    fields[#fields + 1] = 'claim_lease_ms'
    fields[#fields + 1] = claim_ms
    fields[#fields + 1] = 'claim_event_id'
    fields[#fields + 1] = emit_first(id, 'running', RUNNING, RUNNING_AT_ONCE_EVENT_ID,
      {'attempt', '1'})
    claimed = fields
  else
    emit_first(id, 'queued', QUEUED, FIRST_EVENT_ID)
  end
  -- What the caller's answer needs beyond what it sent, so it doesn't read the request back.
  -- Its place: first in a queue that was empty (no ZRANK then).
  local position = length == 0 and 1 or redis.call('ZRANK', K.queue, member) + 1
  return {'queued', id, position, length + 1, fmt(start),
    tostring(max_attempts), tostring(timeout), revived, fmt(vtime), running}, claimed
end

local reply, claimed = enqueue()
if claiming then
  reply[#reply + 1] = claimed
    or claim_next(K.queue, claim_ms, claim_owner, claim_token, '1', '') or false
end
return reply
