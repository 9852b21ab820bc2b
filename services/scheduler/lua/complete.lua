-- Finish a leased request (COMPLETED, FAILED or CANCELLED), fenced by its lease token.
-- KEYS[1] queue (declares the slot)
-- ARGV: 1 base, 2 now, 3 id, 4 lease token, 5 state, 6 error, 7 ttl s,
--       8 actual token cost (-1 = unknown), 9 service ms, 10 tokens/s, 11 output tokens,
--       12 moving-average alpha, 13 service time's moving-average alpha,
--       14.. extra field/value pairs (result, usage)
-- Returns 1, or -1 when the lease was lost (another dispatcher owns the request now).
local id, state = ARGV[3], tonumber(ARGV[5])
local rk = req_key(id)
if tonumber(redis.call('HGET', rk, 'state')) ~= RUNNING
    or redis.call('HGET', rk, 'lease_token') ~= ARGV[4] then
  return -1
end
if #ARGV >= 14 then redis.call('HSET', rk, unpack(ARGV, 14)) end

-- Settle the flow's finish tag with the actual cost (fairness.py: corrected_finish), never
-- below the start of the flow's newest request, so its queued requests keep their order.
local actual = tonumber(ARGV[8])
if actual >= 0 then
  local flow = redis.call('HGET', rk, 'flow')
  local estimated = tonumber(redis.call('HGET', rk, 'cost'))
  local weight = tonumber(redis.call('HGET', rk, 'weight'))
  local finish, last = unpack(redis.call('HMGET', K.fairness, 'flow:' .. flow, 'last:' .. flow))
  local settled = tonumber(finish or '0') + (actual - estimated) / weight
  if last then settled = math.max(settled, tonumber(last)) end
  redis.call('HSET', K.fairness, 'flow:' .. flow, fmt(settled))
end

-- Moving averages of completed work (eta.py: ewma, ewma_variance). The service time's has
-- its own alpha and weighs its n-th sample at least 1/n, so its first samples are a plain
-- mean (a mean recorded before the count existed keeps the plain alpha).
if state == COMPLETED then
  local alpha = tonumber(ARGV[12])
  local service = tonumber(ARGV[9])
  local mean = tonumber(redis.call('HGET', K.stats, 'service_ms'))
  local samples = redis.call('HINCRBY', K.stats, 'service_n', 1)
  if mean then
    local weight = tonumber(ARGV[13])
    if samples > 1 then weight = math.max(weight, 1 / samples) end
    local var = tonumber(redis.call('HGET', K.stats, 'service_var') or '0')
    local delta = service - mean
    redis.call('HSET', K.stats, 'service_ms', fmt(mean + weight * delta),
      'service_var', fmt((1 - weight) * (var + weight * delta * delta)))
  else
    redis.call('HSET', K.stats, 'service_ms', fmt(service), 'service_var', '0')
  end
  for _, pair in ipairs({{'tokens_per_s', tonumber(ARGV[10])}, {'output_tokens', tonumber(ARGV[11])}}) do
    if pair[2] > 0 then
      local old = tonumber(redis.call('HGET', K.stats, pair[1]))
      redis.call('HSET', K.stats, pair[1], fmt(old and (old + alpha * (pair[2] - old)) or pair[2]))
    end
  end
  local wait = tonumber(redis.call('HGET', rk, 'started_ms')) - tonumber(redis.call('HGET', rk, 'created_ms'))
  local old_wait = tonumber(redis.call('HGET', K.stats, 'wait_ms'))
  redis.call('HSET', K.stats, 'wait_ms', fmt(old_wait and (old_wait + alpha * (wait - old_wait)) or wait))
end

local reason = ARGV[6]
if state == CANCELLED and reason == '' then
  reason = redis.call('HGET', rk, 'cancel_reason') or 'cancelled'
end
finish(id, rk, state, reason, tonumber(ARGV[7]))
if state == FAILED then
  -- A dispatched request that failed for good (its last attempt, or an error no retry can
  -- mend) is kept, with its cause, on the dead-letter list until an operator retries it.
  redis.call('ZADD', K.dead_letters, NOW, id)
  redis.call('PERSIST', rk)
  redis.call('PERSIST', req_owners_key(id))
  redis.call('PERSIST', req_events_key(id))
end
emit(id, ({[COMPLETED] = 'completed', [FAILED] = 'failed', [CANCELLED] = 'cancelled'})[state],
  state, {'error', reason})
return 1
