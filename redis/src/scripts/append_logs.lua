-- KEYS: run hash, log stream. ARGV: id, claim token, the cap (bytes), origin, the line that
-- says the log was cut, then (step or '', stream, at in ms, bytes) for each chunk.
--
-- Each chunk is a stream entry whose ID is `OFFSET-1` (its first byte's offset in the log), so
-- `XREVRANGE log OFFSET-1 - COUNT 1` finds the chunk holding an offset.
local bad = check_claim(KEYS[1], ARGV[2])
if bad then return {bad} end
local r = redis.call('HMGET', KEYS[1], 'log_len', 'log_cut')
local len = tonumber(r[1] or '0')
local cut = r[2] == '1'
local cap = tonumber(ARGV[3])
local wrote = false
for i = 6, #ARGV, 4 do
  local data = ARGV[i + 3]
  if not cut and #data > 0 then
    if len + #data > cap then
      redis.call('XADD', KEYS[2], int(len) .. '-1', 'v', '1', 's', '', 't', 'skiff', 'a', int(now_ms()),
        'd', ARGV[5])
      len = len + #ARGV[5]
      cut = true
      redis.call('HSET', KEYS[1], 'log_cut', '1')
    else
      redis.call('XADD', KEYS[2], int(len) .. '-1', 'v', '1', 's', ARGV[i], 't', ARGV[i + 1],
        'a', ARGV[i + 2], 'd', data)
      len = len + #data
    end
    wrote = true
  end
end
if wrote then
  redis.call('HSET', KEYS[1], 'log_len', int(len))
  publish(ARGV[4], 'log', 'r:' .. ARGV[1])
end
return {'ok', int(len)}
