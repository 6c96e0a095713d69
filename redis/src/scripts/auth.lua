-- Credentials, under `skiff:auth:` (never readable by a worker's ACL user). One script, the
-- operation named by ARGV[1]; times come from the server's clock (ARGV), as the expiries the
-- server hands out do.
local A = 'skiff:auth:'
local op = ARGV[1]
if op == 'create_token' then
  -- id, name, hash, scope, created_at
  if redis.call('HEXISTS', A .. 'token_by_hash', ARGV[4]) == 1 then
    return redis.error_reply('a token with this hash exists')
  end
  redis.call('HSET', A .. 'token:' .. ARGV[2], 'v', '1', 'id', ARGV[2], 'name', ARGV[3],
    'hash', ARGV[4], 'scope', ARGV[5], 'legacy', '0', 'created_at', ARGV[6])
  redis.call('HSET', A .. 'token_by_hash', ARGV[4], ARGV[2])
  redis.call('ZADD', A .. 'tokens', ARGV[6], ARGV[2])
  return 1
elseif op == 'revoke_token' then
  -- id, now
  local key = A .. 'token:' .. ARGV[2]
  if redis.call('EXISTS', key) == 0 or redis.call('HEXISTS', key, 'revoked_at') == 1 then
    return 0
  end
  redis.call('HSET', key, 'revoked_at', ARGV[3])
  return 1
elseif op == 'find_token' then
  -- hash, now
  local id = redis.call('HGET', A .. 'token_by_hash', ARGV[2])
  if not id then return {} end
  local key = A .. 'token:' .. id
  if redis.call('EXISTS', key) == 0 or redis.call('HEXISTS', key, 'revoked_at') == 1 then
    return {}
  end
  redis.call('HSET', key, 'last_used_at', ARGV[3])
  return redis.call('HGETALL', key)
elseif op == 'create_session' then
  -- hash, csrf, now, expires_at
  local key = A .. 'session:' .. ARGV[2]
  -- Sessions expire by themselves; their names go from the set here.
  for _, hash in ipairs(redis.call('SMEMBERS', A .. 'sessions')) do
    if redis.call('EXISTS', A .. 'session:' .. hash) == 0 then
      redis.call('SREM', A .. 'sessions', hash)
    end
  end
  redis.call('HSET', key, 'v', '1', 'csrf', ARGV[3], 'created_at', ARGV[4], 'expires_at', ARGV[5])
  redis.call('PEXPIREAT', key, ARGV[5])
  redis.call('SADD', A .. 'sessions', ARGV[2])
  return 1
elseif op == 'delete_session' then
  redis.call('DEL', A .. 'session:' .. ARGV[2])
  redis.call('SREM', A .. 'sessions', ARGV[2])
  return 1
elseif op == 'delete_sessions_except' then
  for _, hash in ipairs(redis.call('SMEMBERS', A .. 'sessions')) do
    if hash ~= ARGV[2] then
      redis.call('DEL', A .. 'session:' .. hash)
      redis.call('SREM', A .. 'sessions', hash)
    end
  end
  return 1
elseif op == 'use_login_link' then
  -- hash, now
  local key = A .. 'link:' .. ARGV[2]
  local r = redis.call('HMGET', key, 'expires_at', 'used_at')
  if not r[1] or r[2] or tonumber(r[1]) <= tonumber(ARGV[3]) then return 0 end
  redis.call('HSET', key, 'used_at', ARGV[3])
  return 1
end
return redis.error_reply('unknown operation ' .. tostring(op))
