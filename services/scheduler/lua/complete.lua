-- Finish a leased request (COMPLETED, FAILED or CANCELLED), fenced by its lease token.
-- KEYS[1] queue (declares the slot)
-- ARGV: 1 base, 2 now, 3 id, 4 lease token, 5 state, 6 error, 7 ttl s,
--       8 actual token cost (-1 = unknown), 9 service ms, 10 tokens/s, 11 output tokens,
--       12 moving-average alpha, 13 service time's moving-average alpha,
--       14 the id of the request's last event as the caller knows it ('' = look it up;
--       '-' = not wanted: nobody in the caller's process is handed the events),
--       15 the count of extra items that follow, then extra field/value pairs (result,
--       usage), then progress events not yet written (packed as emit_packed reads them)
-- Returns {1, whether it has an owners set (1/0), the id of the request's event before
-- this call's ('-' when not wanted), the ids of the events this call wrote in order}, or
-- -1 when the lease was lost (another dispatcher owns the request now).
-- Every hash is read once (HMGET) and written once: this runs for every request. What it
-- holds is not measured here (MEMORY USAGE per key): the caller charges its storage from
-- the sizes it knows (services/scheduler/store.py: completed_footprint).
local id, state = ARGV[3], tonumber(ARGV[5])
local rk = req_key(id)
local r = redis.call('HMGET', rk, 'state', 'lease_token', 'flow', 'cost', 'weight',
  'started_ms', 'created_ms', 'dedup', 'cancel_reason', 'owner', 'shared', 'quiet')
local owners_set = has_owners_set(r[10], r[11])
if tonumber(r[1]) ~= RUNNING or r[2] ~= ARGV[4] then
  return -1
end
local extras = tonumber(ARGV[15])
local extra = {unpack(ARGV, 16, 15 + extras)}
-- The caller knows the last event when nothing but its own writes followed the claim's; a
-- cancel asked for meanwhile wrote one of its own.
local after = ARGV[14]
if after == '' or (after ~= '-' and r[9]) then after = last_event_id(id) end
local written = {}
emit_packed(id, RUNNING, 16 + extras, written)
-- Written running at once and nothing since (no output stored, no cancel asked for): its
-- end goes to the model's stream alone, and it never has a stream of its own.
local unstreamed = after == RUNNING_AT_ONCE_EVENT_ID and #written == 0

-- The flow's tags and the model's figures of completed work (outcome counters, moving
-- averages) share the fairness hash (usher/keys.py): one HMGET and one HSET for both. A
-- model whose figures are still in its stats hash (kept there before they moved; no
-- 'figures' mark yet) has its averages read from there and moved.
local flow = r[3]
local counter = ({[COMPLETED] = 'completed', [FAILED] = 'failed', [CANCELLED] = 'cancelled'})[state]
local f = redis.call('HMGET', K.fairness, 'flow:' .. flow, 'last:' .. flow, 'figures', counter,
  'service_ms', 'service_n', 'service_var', 'tokens_per_s', 'output_tokens', 'wait_ms')
local s = {unpack(f, 4, 10)}
local stats = {counter, tonumber(s[1] or '0') + 1}
if f[3] ~= '1' then
  local old = redis.call('HMGET', K.stats, 'service_ms', 'service_n', 'service_var',
    'tokens_per_s', 'output_tokens', 'wait_ms')
  for i = 1, 6 do s[i + 1] = s[i + 1] or old[i] end
  stats[#stats + 1] = 'figures'
  stats[#stats + 1] = '1'
  for i, name in ipairs({'service_ms', 'service_n', 'service_var', 'tokens_per_s',
      'output_tokens', 'wait_ms'}) do
    if s[i + 1] then
      stats[#stats + 1] = name
      stats[#stats + 1] = s[i + 1]
    end
  end
end

-- Settle the flow's finish tag with the actual cost (fairness.py: corrected_finish), never
-- below the start of the flow's newest request, so its queued requests keep their order.
local actual = tonumber(ARGV[8])
if actual >= 0 then
  local estimated, weight = tonumber(r[4]), tonumber(r[5])
  local settled = tonumber(f[1] or '0') + (actual - estimated) / weight
  if f[2] then settled = math.max(settled, tonumber(f[2])) end
  stats[#stats + 1] = 'flow:' .. flow
  stats[#stats + 1] = fmt(settled)
end

-- Moving averages of completed work (eta.py: ewma, ewma_variance). The service time's has
-- its own alpha and weighs its n-th sample at least 1/n, so its first samples are a plain
-- mean (a mean recorded before the count existed keeps the plain alpha). The outcome's
-- counter is written here too, in the same HSET.
if state == COMPLETED then
  local alpha = tonumber(ARGV[12])
  local service = tonumber(ARGV[9])
  local mean = tonumber(s[2])
  local samples = tonumber(s[3] or '0') + 1
  stats[#stats + 1] = 'service_n'
  stats[#stats + 1] = samples
  if mean then
    local weight = tonumber(ARGV[13])
    if samples > 1 then weight = math.max(weight, 1 / samples) end
    local var = tonumber(s[4] or '0')
    local delta = service - mean
    for _, v in ipairs({'service_ms', fmt(mean + weight * delta),
        'service_var', fmt((1 - weight) * (var + weight * delta * delta))}) do
      stats[#stats + 1] = v
    end
  else
    for _, v in ipairs({'service_ms', fmt(service), 'service_var', '0'}) do stats[#stats + 1] = v end
  end
  for i, pair in ipairs({{'tokens_per_s', tonumber(ARGV[10])}, {'output_tokens', tonumber(ARGV[11])}}) do
    if pair[2] > 0 then
      local old = tonumber(s[4 + i])
      stats[#stats + 1] = pair[1]
      stats[#stats + 1] = fmt(old and (old + alpha * (pair[2] - old)) or pair[2])
    end
  end
  local wait = tonumber(r[6]) - tonumber(r[7])
  local old_wait = tonumber(s[7])
  stats[#stats + 1] = 'wait_ms'
  stats[#stats + 1] = fmt(old_wait and (old_wait + alpha * (wait - old_wait)) or wait)
end
redis.call('HSET', K.fairness, unpack(stats))

local reason = ARGV[6]
if state == CANCELLED and reason == '' then
  reason = r[9] or 'cancelled'
end
finish(id, rk, state, reason, tonumber(ARGV[7]),
  {fields = extra, dedup = r[8], counted = true, running = true, owners_set = owners_set,
   unstreamed = unstreamed, quiet = r[12] == '1'})
if state == FAILED then
  -- A dispatched request that failed for good (its last attempt, or an error no retry can
  -- mend) is kept, with its cause, on the dead-letter list until an operator retries it.
  redis.call('ZADD', K.dead_letters, NOW, id)
  redis.call('PERSIST', rk)
  if owners_set then redis.call('PERSIST', req_owners_key(id)) end
  if not unstreamed then redis.call('PERSIST', req_events_key(id)) end
end
local kind = ({[COMPLETED] = 'completed', [FAILED] = 'failed', [CANCELLED] = 'cancelled'})[state]
if unstreamed then
  written[#written + 1] = emit_first(id, kind, state, UNSTREAMED_END_EVENT_ID, {'error', reason})
else
  written[#written + 1] = emit(id, kind, state, {'error', reason})
end
return {1, owners_set and 1 or 0, after, written}
