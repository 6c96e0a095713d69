-- KEYS: run hash, steps hash. ARGV: id, claim token, origin.
local bad = check_claim(KEYS[1], ARGV[2])
if bad then return {bad} end
local states = redis.call('HGETALL', KEYS[2])
for i = 1, #states, 2 do
  if string.sub(states[i], 1, 2) == 's:' then
    local ok, state = pcall(cjson.decode, states[i + 1])
    if not ok or type(state) ~= 'table' or state.status ~= 'pending' then
      return {'started'}
    end
  end
end
local r = redis.call('HMGET', KEYS[1], 'pipeline', 'seq')
redis.call('HSET', KEYS[1], 'status', 'queued')
redis.call('HDEL', KEYS[1], 'started_at', 'claimed_by', 'lease_until')
redis.call('HINCRBY', KEYS[1], 'claim_token', 1)
index_status(ARGV[1], r[1], r[2], 'running', 'queued')
publish(ARGV[3], 'status', 'r:' .. ARGV[1])
return {'ok', redis.call('HGETALL', KEYS[1])}
