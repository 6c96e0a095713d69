-- KEYS: run hash. ARGV: id, worker, lease (ms), '1' to take it whatever its lease, origin.
local r = redis.call('HMGET', KEYS[1], 'status', 'claimed_by', 'lease_until')
if not r[1] then return {'notfound'} end
if r[1] ~= 'running' then return {'state', r[1]} end
local now = now_ms()
if ARGV[4] ~= '1' and tonumber(r[3] or '0') >= now then
  return {'held', r[2] or '', r[3] or int(now)}
end
redis.call('HSET', KEYS[1], 'claimed_by', ARGV[2], 'lease_until', int(now + tonumber(ARGV[3])))
redis.call('HINCRBY', KEYS[1], 'claim_token', 1)
publish(ARGV[5], 'status', 'r:' .. ARGV[1])
return {'ok', redis.call('HGETALL', KEYS[1])}
