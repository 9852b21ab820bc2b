-- Emergency drain: end queued requests of a model (both lanes, and those waiting out a retry
-- backoff) with a reason watchers see.
-- KEYS[1] queue (declares the slot)
-- ARGV: 1 base, 2 now, 3 reason, 4 batch limit, 5 ttl s
-- Returns {how many were drained in this call (call again until 0), {id, org, user, ...}}.
local drained = 0
local ended = {}
-- End one request if it is still queued (a member whose request moved on is only dropped).
local function drain(id, waiting_out_backoff)
  local rk = req_key(id)
  if tonumber(redis.call('HGET', rk, 'state')) == QUEUED then
    if waiting_out_backoff then redis.call('HDEL', rk, 'retry_at_ms') end
    finish(id, rk, CANCELLED, ARGV[3], tonumber(ARGV[5]))
    emit(id, 'cancelled', CANCELLED, {'error', ARGV[3]})
    drained = drained + 1
    ended_entry(ended, rk, id)
  end
end
for _, lane in ipairs({K.queue, K.external}) do
  for _, member in ipairs(redis.call('ZRANGE', lane, 0, tonumber(ARGV[4]) - 1)) do
    redis.call('ZREM', lane, member)
    drain(string.sub(member, 18), false)
  end
end
for _, id in ipairs(redis.call('ZRANGE', K.retrying, 0, tonumber(ARGV[4]) - 1)) do
  redis.call('ZREM', K.retrying, id)
  drain(id, true)
end
return {drained, ended}
