-- KEYS: run hash, steps hash. ARGV: id, pipeline, idempotency key ('' for none, else '+KEY'),
-- origin, the number of field/value pairs, the pairs, then (index, plan JSON) pairs.
local id, pipeline, idem, origin = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local idem_key = D .. 'idem:' .. pipeline
if idem ~= '' then
  local existing = redis.call('HGET', idem_key, string.sub(idem, 2))
  if existing and redis.call('EXISTS', run_key(existing)) == 1 then
    return {'exists', redis.call('HGETALL', run_key(existing))}
  end
end
local number = redis.call('HINCRBY', D .. 'numbers', pipeline, 1)
local seq = redis.call('INCR', D .. 'seq')
local now = now_ms()
local n = tonumber(ARGV[5])
local fields = {'v', '1', 'id', id, 'pipeline', pipeline, 'number', number, 'seq', seq,
  'status', 'queued', 'created_at', int(now), 'log_len', '0', 'cancel_requested', '0',
  'claim_token', '0'}
for i = 6, 5 + 2 * n do fields[#fields + 1] = ARGV[i] end
if idem ~= '' then
  fields[#fields + 1] = 'idempotency_key'
  fields[#fields + 1] = string.sub(idem, 2)
end
redis.call('HSET', KEYS[1], unpack(fields))
-- Its concurrency group: held (queued without a job) while another run of it is active.
local group = redis.call('HGET', KEYS[1], 'group')
local held = '0'
if group then
  local gk = D .. 'grp:' .. group
  if redis.call('ZCARD', gk) > 0 then held = '1' end
  redis.call('ZADD', gk, seq, id)
end
redis.call('HSET', KEYS[1], 'held', held)
local plan = {}
for i = 6 + 2 * n, #ARGV, 2 do
  plan[#plan + 1] = 'p:' .. ARGV[i]
  plan[#plan + 1] = ARGV[i + 1]
end
if #plan > 0 then redis.call('HSET', KEYS[2], unpack(plan)) end
redis.call('ZADD', D .. 'runs', seq, id)
redis.call('ZADD', D .. 'runs:p:' .. pipeline, seq, id)
index_status(id, pipeline, seq, nil, 'queued')
redis.call('SADD', D .. 'pipelines', pipeline)
if idem ~= '' then redis.call('HSET', idem_key, string.sub(idem, 2), id) end
publish(origin, 'status', 'r:' .. id)
return {'ok', redis.call('HGETALL', KEYS[1])}
