-- Park leased records for a later attempt, token-checked (design section 2 step 8).
--
-- KEYS: per item i: KEYS[i] = req hash; KEYS[n+1] = leases zset, KEYS[n+2] = retry zset.
-- ARGV: [1] req key prefix `{p}req:`, then per item i (base = 1 + 2(i-1)):
--       token, delay_ms.
-- Returns one integer per item: 1 when the caller held the lease (the record stays
-- pending with its journal and token, moved from leases to retry with score
-- now + delay_ms), else 0 and nothing is written.
--
-- lease_until becomes the retry time + the record's lease length, so claim's live-lease
-- check answers 'in_progress' to a resend while the retry waits; only when no worker
-- takes the retry up within that lease can a resend take the request over.
-- A replay (client retry after a lost reply) finds the same token and re-parks it: 1.
local n = #KEYS - 2
local leases, retry = KEYS[#KEYS - 1], KEYS[#KEYS]
local req_prefix = ARGV[1]
local now = now_ms()
local out = {}
for i = 1, n do
  local req = KEYS[i]
  local b = 1 + 2 * (i - 1)
  local token, delay = ARGV[b + 1], tonumber(ARGV[b + 2])
  local h = redis.call('HMGET', req, 'state', 'token', 'lease_ms')
  if h[1] == 'pending' and h[2] == token then
    local member = member_of(req, req_prefix)
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
