-- Give leases back without a response, token-checked (inference failed, not cached).
--
-- KEYS: per item i: KEYS[i] = req hash; KEYS[n+1] = leases zset, KEYS[n+2] = retry zset.
-- ARGV: per item i (base = 2(i-1)): token, member.
-- Returns one integer per item: 1 when a token-matching pending record was dropped.
local n = #KEYS - 2
local leases, retry = KEYS[#KEYS - 1], KEYS[#KEYS]
local out = {}
for i = 1, n do
  local req = KEYS[i]
  local b = 2 * (i - 1)
  local token, member = ARGV[b + 1], ARGV[b + 2]
  local h = redis.call('HMGET', req, 'state', 'token')
  if h[1] == 'pending' and h[2] == token then
    redis.call('DEL', req)
    redis.call('ZREM', leases, member)
    redis.call('ZREM', retry, member)
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
