-- KEYS: the deliveries index. ARGV: received before (ms), at most this many. Answers how many
-- were deleted.
local S = 'skiff:s:'
local keys = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1], 'LIMIT', 0, ARGV[2])
for _, key in ipairs(keys) do
  local r = redis.call('HMGET', S .. 'dlv:k:' .. key, 'hook', 'id')
  redis.call('DEL', S .. 'dlv:k:' .. key)
  redis.call('ZREM', KEYS[1], key)
  if r[1] then redis.call('ZREM', S .. 'dlv:hook:' .. r[1], key) end
  if r[2] then redis.call('ZREM', S .. 'dlv:id:' .. r[2], key) end
end
return #keys
