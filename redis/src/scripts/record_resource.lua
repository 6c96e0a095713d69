-- KEYS: the resource's hash. ARGV: id, claim run ('' for none), claim token, origin, then
-- field/value pairs (the fields that are set). Recording an id again answers the first record.
if ARGV[2] ~= '' then
  local bad = check_claim(run_key(ARGV[2]), ARGV[3])
  if bad then return {bad} end
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  local now = int(now_ms())
  local fields = {'v', '1', 'id', ARGV[1], 'state', 'creating', 'created_at', now,
    'updated_at', now}
  local run, service
  for i = 5, #ARGV, 2 do
    fields[#fields + 1] = ARGV[i]
    fields[#fields + 1] = ARGV[i + 1]
    if ARGV[i] == 'run' then run = ARGV[i + 1] end
    if ARGV[i] == 'service' then service = ARGV[i + 1] end
  end
  redis.call('HSET', KEYS[1], unpack(fields))
  redis.call('ZADD', D .. 'res:all', now, ARGV[1])
  if run then redis.call('SADD', D .. 'res:run:' .. run, ARGV[1]) end
  if service then redis.call('SADD', D .. 'res:svc:' .. service, ARGV[1]) end
end
publish(ARGV[4], 'resource', 'x:' .. ARGV[1])
return {'ok', redis.call('HGETALL', KEYS[1])}
