-- KEYS: the resource's hash. ARGV: id, claim run ('' for none), claim token, origin, then
-- field/value pairs to change (the others are kept).
if ARGV[2] ~= '' then
  local bad = check_claim(run_key(ARGV[2]), ARGV[3])
  if bad then return {bad} end
end
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
local fields = {'updated_at', int(now_ms())}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
publish(ARGV[4], 'resource', 'x:' .. ARGV[1])
return {'ok', redis.call('HGETALL', KEYS[1])}
