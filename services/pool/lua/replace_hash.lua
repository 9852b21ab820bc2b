-- Replace a hash's whole content at once, so a reader never sees it empty or half written.
-- One key, so it runs on a Redis Cluster (a MULTI over this and other keys would cross slots).
-- KEYS[1] hash; ARGV field, value, field, value, ...
redis.call('DEL', KEYS[1])
if #ARGV > 0 then redis.call('HSET', KEYS[1], unpack(ARGV)) end
return 1
