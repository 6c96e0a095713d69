-- KEYS: the schedule marks' hash. ARGV: schedule key, expected mark (ms, '' for none), slot.
-- Compare-and-set: 1 when the mark moved.
local seen = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[2] == '' then
  if seen then return 0 end
elseif seen ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
