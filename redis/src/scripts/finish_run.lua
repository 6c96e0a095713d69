-- KEYS: run hash, steps hash. ARGV: id, claim token, status, reason ('' for none, else
-- '+REASON'), origin, then (step index, state JSON) pairs, written with the end.
local bad = check_claim(KEYS[1], ARGV[2])
if bad then return {bad} end
local origin = ARGV[5]
local written = 0
for i = 6, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[2], 'p:' .. ARGV[i]) == 1 then
    redis.call('HSET', KEYS[2], 's:' .. ARGV[i], ARGV[i + 1])
  end
  written = written + 1
end
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'finished_at', int(now_ms()))
redis.call('HDEL', KEYS[1], 'lease_until')
if ARGV[4] == '' then
  redis.call('HDEL', KEYS[1], 'reason')
else
  redis.call('HSET', KEYS[1], 'reason', string.sub(ARGV[4], 2))
end
local r = redis.call('HMGET', KEYS[1], 'pipeline', 'seq')
index_status(ARGV[1], r[1], r[2], 'running', ARGV[3])
for _ = 1, written do publish(origin, 'step', 'r:' .. ARGV[1]) end
publish(origin, 'status', 'r:' .. ARGV[1])
release_group(ARGV[1], origin)
return {'ok', redis.call('HGETALL', KEYS[1])}
