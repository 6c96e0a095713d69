-- KEYS: the schedule's mark. ARGV: expected mark (ms, '' for none), slot (ms).
-- Compare-and-set: 1 when the mark moved.
local seen = redis.call('HGET', KEYS[1], 'slot')
if ARGV[1] == '' then
  if seen then return 0 end
elseif seen ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'v', '1', 'slot', ARGV[2])
return 1
