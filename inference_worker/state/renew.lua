-- Extend the leases of records a worker is still working on (queued or computing).
-- KEYS[1] = leases zset; KEYS[1 + i] = req hash of item i
-- ARGV[1] = lease_ms; ARGV[1 + i] = token of item i; ARGV[1 + n + i] = zset member of item i
-- Returns per item 1 (renewed) or 0 (lease lost: other token, done, gone, or parked for retry).
local lease_ms = tonumber(ARGV[1])
local n = #KEYS - 1
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 1, n do
  local key = KEYS[1 + i]
  local state = redis.call('HMGET', key, 'state', 'token')
  local member = ARGV[1 + n + i]
  if state[1] == 'pending' and state[2] == ARGV[1 + i]
      and redis.call('ZSCORE', KEYS[1], member) then
    local until_ms = now + lease_ms
    redis.call('HSET', key, 'lease_until', until_ms)
    redis.call('ZADD', KEYS[1], until_ms, member)
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
