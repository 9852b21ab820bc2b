-- Free a slot.
-- KEYS[1] instance slots, KEYS[2] model slots
-- ARGV: 1 slot id
-- Returns 1 when it was held, 0 when it had already gone.
local held = redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
return held
