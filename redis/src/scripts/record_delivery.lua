-- KEYS: the delivery's hash. ARGV: key, hook, delivery id, received at (ms), the rest (JSON),
-- body. Recording a key again changes nothing.
local S = 'skiff:s:'
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'v', '1', 'key', ARGV[1], 'hook', ARGV[2], 'id', ARGV[3],
  'received_at', ARGV[4], 'meta', ARGV[5], 'body', ARGV[6])
redis.call('ZADD', S .. 'dlv:time', ARGV[4], ARGV[1])
redis.call('ZADD', S .. 'dlv:hook:' .. ARGV[2], ARGV[4], ARGV[1])
redis.call('ZADD', S .. 'dlv:id:' .. ARGV[3], ARGV[4], ARGV[1])
return 1
