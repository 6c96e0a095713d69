-- Shared by every skiff script (prepended to each). Keys the scripts derive themselves are all
-- under `skiff:d:` (what a worker may touch) or `skiff:s:` (server-only), as keys.rs documents.
local D = 'skiff:d:'

-- The one clock: Redis's own, in milliseconds since the epoch.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A whole number as text, never in exponent form.
local function int(x)
  return string.format('%.0f', x)
end

local function run_key(id) return D .. 'run:' .. id end
local function steps_key(id) return D .. 'run:' .. id .. ':steps' end
local function log_key(id) return D .. 'run:' .. id .. ':log' end

-- Announces a change: `ORIGIN KIND SUBJECT` on the change channel.
local function publish(origin, kind, subject)
  redis.call('PUBLISH', D .. 'changes', origin .. ' ' .. kind .. ' ' .. subject)
end

-- Moves a run between the status indexes (all runs, and the runs of its pipeline).
local function index_status(id, pipeline, seq, from, to)
  if from then
    redis.call('ZREM', D .. 'runs:s:' .. from, id)
    redis.call('ZREM', D .. 'runs:ps:' .. pipeline .. ':' .. from, id)
  end
  if to then
    redis.call('ZADD', D .. 'runs:s:' .. to, seq, id)
    redis.call('ZADD', D .. 'runs:ps:' .. pipeline .. ':' .. to, seq, id)
  end
end

-- Whether the claim with `token` still holds the run: nil when it does, else the reason.
local function check_claim(key, token)
  local r = redis.call('HMGET', key, 'status', 'claim_token')
  if not r[1] then return 'notfound' end
  if r[1] ~= 'running' or r[2] ~= token then return 'stale' end
  return nil
end

-- Lets the next run of a run's concurrency group go (the run has ended, or was cancelled while
-- queued): the run leaves its group's active set; if the oldest run left is held, it is held no
-- more and its job goes on its label set's list (as the queue pushes it, pokes included).
local function release_group(id, origin)
  local g = redis.call('HGET', run_key(id), 'group')
  if not g then return end
  local gk = D .. 'grp:' .. g
  redis.call('ZREM', gk, id)
  local nxt = redis.call('ZRANGE', gk, 0, 0)[1]
  if not nxt then return end
  local nk = run_key(nxt)
  if redis.call('HGET', nk, 'held') ~= '1' then return end
  redis.call('HSET', nk, 'held', '0')
  local ok, labels = pcall(cjson.decode, redis.call('HGET', nk, 'labels') or '[]')
  if not ok or type(labels) ~= 'table' then labels = {} end
  local name = 'v1:any'
  if #labels > 0 then name = 'v1:' .. table.concat(labels, ',') end
  local t = redis.call('TIME')
  local us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local job = '{"v":1,"run_id":' .. cjson.encode(nxt) .. ',"pushed_at_us":' .. int(us)
  if #labels > 0 then job = job .. ',"labels":' .. cjson.encode(labels) end
  job = job .. '}'
  redis.call('RPUSH', D .. 'q:' .. name, job)
  if redis.call('SADD', D .. 'queues', name) == 1 then
    for _, w in ipairs(redis.call('HKEYS', D .. 'workers')) do
      local poke = D .. 'poke:' .. w
      redis.call('RPUSH', poke, 'queues')
      redis.call('EXPIRE', poke, 60)
    end
  end
  publish(origin, 'status', 'r:' .. nxt)
end
