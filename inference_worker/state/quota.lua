-- Per-app token buckets for one claim group, in one call.
-- KEYS[i]  = bucket hash of the i-th distinct app ({prefix}quota:{app})
-- ARGV[1]  = rate (tokens per second), ARGV[2] = burst (bucket size)
-- ARGV[3..] = for each request in order, the index (1-based) of its app in KEYS
-- Returns, per request, 0 when admitted, else the milliseconds until one token is back.
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local now = now_ms()
local tokens = {}
for i, key in ipairs(KEYS) do
  local state = redis.call('HMGET', key, 'tokens', 'ts')
  local level = tonumber(state[1])
  local ts = tonumber(state[2])
  if level == nil then
    level = burst
  else
    level = math.min(burst, level + (now - ts) * rate / 1000)
  end
  tokens[i] = level
end
local out = {}
for j = 3, #ARGV do
  local i = tonumber(ARGV[j])
  if tokens[i] >= 1 then
    tokens[i] = tokens[i] - 1
    out[#out + 1] = 0
  else
    out[#out + 1] = math.ceil((1 - tokens[i]) * 1000 / rate)
  end
end
-- A bucket idle long enough to refill completely carries no state worth keeping.
local ttl = math.ceil(burst / rate) + 1
for i, key in ipairs(KEYS) do
  redis.call('HSET', key, 'tokens', tostring(tokens[i]), 'ts', now)
  redis.call('EXPIRE', key, ttl)
end
return out
