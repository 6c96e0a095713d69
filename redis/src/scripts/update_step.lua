-- KEYS: run hash, steps hash. ARGV: id, claim token, step index, state JSON, origin.
local bad = check_claim(KEYS[1], ARGV[2])
if bad then return {bad} end
if redis.call('HEXISTS', KEYS[2], 'p:' .. ARGV[3]) == 0 then return {'stale'} end
redis.call('HSET', KEYS[2], 's:' .. ARGV[3], ARGV[4])
publish(ARGV[5], 'step', 'r:' .. ARGV[1])
return {'ok'}
