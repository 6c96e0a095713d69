-- KEYS: the pipeline's run index. ARGV: pipeline, finished before (ms, '' for no limit), keep
-- the newest N finished ('' for no limit), at most this many deleted, origin. Deletes finished
-- runs (oldest first) with their steps and log; answers their ids. Numbers are never given
-- again: `skiff:d:numbers` only ever grows.
local pipeline = ARGV[1]
local before = tonumber(ARGV[2])
local keep = tonumber(ARGV[3])
local batch = tonumber(ARGV[4])
local origin = ARGV[5]
local ids = redis.call('ZREVRANGE', KEYS[1], 0, -1)
local finished = 0
local doomed = {}
for _, id in ipairs(ids) do
  local r = redis.call('HMGET', run_key(id), 'status', 'finished_at')
  if r[1] and r[1] ~= 'queued' and r[1] ~= 'running' then
    finished = finished + 1
    local old = before and r[2] and tonumber(r[2]) < before
    -- Beyond the newest `keep` finished runs (keeping none keeps them all, as SQLite does).
    local beyond = keep and keep > 0 and finished > keep
    if old or beyond then doomed[#doomed + 1] = id end
  end
end
local deleted = {}
-- Oldest first.
for i = #doomed, math.max(1, #doomed - batch + 1), -1 do
  local id = doomed[i]
  local r = redis.call('HMGET', run_key(id), 'status', 'idempotency_key')
  redis.call('DEL', run_key(id), steps_key(id), log_key(id))
  redis.call('ZREM', D .. 'runs', id)
  redis.call('ZREM', KEYS[1], id)
  index_status(id, pipeline, 0, r[1], nil)
  if r[2] and redis.call('HGET', D .. 'idem:' .. pipeline, r[2]) == id then
    redis.call('HDEL', D .. 'idem:' .. pipeline, r[2])
  end
  publish(origin, 'deleted', 'r:' .. id)
  deleted[#deleted + 1] = id
end
if redis.call('ZCARD', KEYS[1]) == 0 then redis.call('SREM', D .. 'pipelines', pipeline) end
return deleted
