-- KEYS: run hash. ARGV: id, worker, lease (ms), origin.
local r = redis.call('HMGET', KEYS[1], 'status', 'pipeline', 'seq', 'held')
if not r[1] then return {'notfound'} end
if r[1] ~= 'queued' then return {'state', r[1]} end
-- Held for its concurrency group: not before the runs ahead of it end.
if r[4] == '1' then return {'state', r[1]} end
local now = now_ms()
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', int(now), 'claimed_by', ARGV[2],
  'lease_until', int(now + tonumber(ARGV[3])))
redis.call('HINCRBY', KEYS[1], 'claim_token', 1)
index_status(ARGV[1], r[2], r[3], 'queued', 'running')
publish(ARGV[4], 'status', 'r:' .. ARGV[1])
return {'ok', redis.call('HGETALL', KEYS[1])}
