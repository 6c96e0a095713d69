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
