-- Pop the head of a queue and lease it to a dispatcher, in one step so nothing is lost between.
-- KEYS[1] the queue to claim from (the model's queue, or its external lane)
-- ARGV: 1 base, 2 now, 3 lease ms, 4 owner, 5 lease token, 6 advance virtual time (1/0),
--       7 a request to claim first, ahead of the fair order ('' = none)
-- Returns the claimed request hash as a flat field/value list, followed by 'claim_event_id'
-- and the id of the event it wrote (not a field of the hash), or nil when the queue is empty.
return claim_next(KEYS[1], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7] or '')
