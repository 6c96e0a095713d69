-- KEYS: run hash. ARGV: claim token, lease (ms).
local bad = check_claim(KEYS[1], ARGV[1])
if bad then return {bad} end
local until_ms = int(now_ms() + tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], 'lease_until', until_ms)
return {'ok', until_ms}
