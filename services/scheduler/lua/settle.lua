-- Requests of one tenant stopped being live, or their stored sizes changed (they ended and
-- their prompts were dropped, results were kept): free their concurrency slots, charge
-- their storage at what they hold now, refund what admission took when nothing was stored
-- at all. Several requests in one call: a dispatcher's settles of the moment share it.
-- KEYS[1] buckets (HASH), KEYS[2] live (ZSET), KEYS[3] storage charges (ZSET), KEYS[4] bytes
-- (HASH, as admit.lua keeps it)
-- ARGV: 1 now ms, 2 requests to refund, 3 tokens to refund, 4 whether they may hold live
--       entries (1/0: 0 when the tenant had no concurrency quota, so admit.lua added none),
--       then for each request: its id, the bytes it stores now (-1 = none: drop the charge),
--       when the charge lapses (ms; 0 = keep its current lapse)
local first, count = 5, math.floor((#ARGV - 4) / 3)
local ids = {}
for i = 0, count - 1 do ids[i + 1] = ARGV[first + 3 * i] end
if count > 0 then
  if ARGV[4] ~= '0' then redis.call('ZREM', KEYS[2], unpack(ids)) end
  local wanted = {'total', 'next', 'until'}
  for i, id in ipairs(ids) do
    wanted[3 + i] = id
    wanted[3 + count + i] = 'lapse:' .. id
  end
  local stored = redis.call('HMGET', KEYS[4], unpack(wanted))
  local now = tonumber(ARGV[1])
  local total = tonumber(stored[1] or '0')
  local next_lapse, expires = tonumber(stored[2] or '0'), tonumber(stored[3] or '0')
  local charge, dropped, lapses = {}, {}, {}
  local changed, moved_next, moved_until = false, false, false
  for i = 1, count do
    local charged = stored[3 + i]
    if charged then
      local id = ids[i]
      local bytes, lapse = tonumber(ARGV[first + 3 * (i - 1) + 1]), tonumber(ARGV[first + 3 * (i - 1) + 2])
      changed = true
      if bytes < 0 then
        total = total - tonumber(charged)
        dropped[#dropped + 1] = id
        dropped[#dropped + 1] = 'lapse:' .. id
      else
        total = total + bytes - tonumber(charged)
        charge[#charge + 1] = id
        charge[#charge + 1] = bytes
        -- A charge lapsing a little after its data (admission's lapse, which allowed for
        -- the whole queue timeout, is later than the end's) keeps it: no ZADD. "A little":
        -- by no more than a sixteenth of what is left of the data's time.
        local held = tonumber(stored[3 + count + i] or '0')
        if lapse > 0 and held >= lapse and held - lapse <= (lapse - now) / 16 then
          lapse = 0
        end
        if lapse > 0 then
          charge[#charge + 1] = 'lapse:' .. id
          charge[#charge + 1] = lapse
          lapses[#lapses + 1] = lapse
          lapses[#lapses + 1] = id
          -- 'next' stays at or before the earliest lapse (admit.lua sweeps from it).
          if lapse < next_lapse then next_lapse, moved_next = lapse, true end
          if lapse > expires then expires, moved_until = lapse + 3600000, true end
        end
      end
    end
  end
  if changed then
    if #dropped > 0 then
      redis.call('HDEL', KEYS[4], unpack(dropped))
      local gone = {}
      for i = 1, #dropped, 2 do gone[#gone + 1] = dropped[i] end
      redis.call('ZREM', KEYS[3], unpack(gone))
    end
    if #lapses > 0 then redis.call('ZADD', KEYS[3], unpack(lapses)) end
    charge[#charge + 1] = 'total'
    charge[#charge + 1] = total
    if moved_next then
      charge[#charge + 1] = 'next'
      charge[#charge + 1] = next_lapse
    end
    if moved_until then
      charge[#charge + 1] = 'until'
      charge[#charge + 1] = expires
      redis.call('PEXPIREAT', KEYS[3], expires)
      redis.call('PEXPIREAT', KEYS[4], expires)
    end
    redis.call('HSET', KEYS[4], unpack(charge))
  end
end
if tonumber(ARGV[2]) > 0 then redis.call('HINCRBYFLOAT', KEYS[1], 'requests', ARGV[2]) end
if tonumber(ARGV[3]) > 0 then redis.call('HINCRBYFLOAT', KEYS[1], 'tokens', ARGV[3]) end
return 1
