-- Give back leases without an answer and forget the records (a request turned away
-- after its claim, e.g. over its app's quota), token-checked, so a resend is claimed
-- afresh instead of waiting for a lease to expire.
--
-- KEYS: per item i: KEYS[i] = req hash; KEYS[n+1] = leases zset, KEYS[n+2] = retry zset.
-- ARGV: [1] req key prefix `{p}req:`, then per item i: ARGV[i+1] = token.
-- Returns one integer per item: 1 when the caller held a pending record and it is gone.
local n = #KEYS - 2
local leases, retry = KEYS[n + 1], KEYS[n + 2]
local req_prefix = ARGV[1]
local out = {}
for i = 1, n do
  local req = KEYS[i]
  local h = redis.call('HMGET', req, 'state', 'token')
  if h[1] == 'pending' and h[2] == ARGV[i + 1] then
    local member = member_of(req, req_prefix)
    redis.call('DEL', req)
    redis.call('ZREM', leases, member)
    redis.call('ZREM', retry, member)
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
