-- KEYS: run hash, steps hash. ARGV: id, reason, origin.
local r = redis.call('HMGET', KEYS[1], 'status', 'cancel_requested', 'pipeline', 'seq')
if not r[1] then return {'notfound'} end
if r[1] == 'queued' or r[1] == 'running' then
  if r[2] ~= '1' then redis.call('HSET', KEYS[1], 'cancel_reason', ARGV[2]) end
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
end
if r[1] == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', int(now_ms()),
    'reason', ARGV[2])
  index_status(ARGV[1], r[3], r[4], 'queued', 'cancelled')
  -- A queued run's steps never start.
  local steps = redis.call('HGETALL', KEYS[2])
  local states = {}
  for i = 1, #steps, 2 do states[steps[i]] = steps[i + 1] end
  for field, _ in pairs(states) do
    local idx = string.match(field, '^p:(%d+)$')
    if idx then
      local state = states['s:' .. idx]
      if not state then
        redis.call('HSET', KEYS[2], 's:' .. idx,
          '{"v":1,"status":"skipped","attempt":0,"reason":"run cancelled","outputs":{}}')
      else
        local s = cjson.decode(state)
        if s['status'] == 'pending' then
          s['status'] = 'skipped'
          s['reason'] = 'run cancelled'
          redis.call('HSET', KEYS[2], 's:' .. idx, cjson.encode(s))
        end
      end
    end
  end
end
publish(ARGV[3], 'cancel', 'r:' .. ARGV[1])
if r[1] == 'queued' then release_group(ARGV[1], ARGV[3]) end
return {'ok', redis.call('HGETALL', KEYS[1])}
