-- KEYS: run hash, log stream. ARGV: offset, max bytes. Answers the log's length and the chunks
-- (offset, step, stream, at, bytes) from the one holding the offset on, about max bytes' worth
-- (the caller cuts them to size). The length and the chunks are read at one moment.
local len = redis.call('HGET', KEYS[1], 'log_len')
if not len then return {'notfound'} end
len = tonumber(len)
local offset = tonumber(ARGV[1])
local max = tonumber(ARGV[2])
if offset > len then return {'range', int(len)} end
local out = {'ok', int(len)}
local from = '-'
local holding = redis.call('XREVRANGE', KEYS[2], int(offset) .. '-1', '-', 'COUNT', 1)
if #holding > 0 then from = holding[1][1] end
local total, count = 0, 0
while true do
  local entries = redis.call('XRANGE', KEYS[2], from, '+', 'COUNT', 64)
  if #entries == 0 then return out end
  for _, e in ipairs(entries) do
    local start = tonumber(string.match(e[1], '^(%d+)'))
    if start >= len then return out end
    local f = {}
    for j = 1, #e[2], 2 do f[e[2][j]] = e[2][j + 1] end
    if f['v'] ~= '1' then return {'version', f['v'] or ''} end
    local data = f['d'] or ''
    local stop = math.min(start + #data, len)
    if stop > offset then
      out[#out + 1] = int(start)
      out[#out + 1] = f['s'] or ''
      out[#out + 1] = f['t'] or 'output'
      out[#out + 1] = f['a'] or '0'
      out[#out + 1] = data
      total = total + (stop - math.max(start, offset))
      count = count + 1
      if total >= max or count >= 1024 then return out end
    end
  end
  from = '(' .. entries[#entries][1]
end
