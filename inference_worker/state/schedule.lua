-- Park leased records for a later attempt, token-checked (design section 2 step 8).
--
-- KEYS: per item i: KEYS[i] = req hash; KEYS[n+1] = leases zset, KEYS[n+2] = retry zset.
-- ARGV: per item i (base = 3(i-1)): token, member, delay_ms.
-- Returns one integer per item: 1 when the caller held the lease (the record stays
-- pending with its payload and token, moved from leases to retry with score
-- now + delay_ms), else 0 and nothing is written.
--
-- lease_until becomes the retry time + the record's lease length, so claim's live-lease
-- check answers 'in_progress' to a resend while the retry waits; only when no worker
-- takes the retry up within that lease can a resend take the request over.
-- A replay (client retry after a lost reply) finds the same token and re-parks it: 1.
local n = #KEYS - 2
local leases, retry = KEYS[#KEYS - 1], KEYS[#KEYS]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 1, n do
  local req = KEYS[i]
  local b = 3 * (i - 1)
  local token, member, delay = ARGV[b + 1], ARGV[b + 2], tonumber(ARGV[b + 3])
  local h = redis.call('HMGET', req, 'state', 'token', 'lease_ms')
  if h[1] == 'pending' and h[2] == token then
    local at = now + delay
    redis.call('HSET', req, 'lease_until', at + (tonumber(h[3]) or 0))
    redis.call('ZREM', leases, member)
    redis.call('ZADD', retry, at, member)
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
