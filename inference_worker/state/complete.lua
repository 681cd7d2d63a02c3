-- Store responses and end leases for a group, token-checked (design section 2 step 7).
--
-- KEYS: per item i: KEYS[2i-1] = req hash, KEYS[2i] = resp string;
--       KEYS[2n+1] = leases zset, KEYS[2n+2] = retry zset.
-- ARGV: [1] result_ttl_s, [2] req key prefix `{p}req:`, [3] the items, one msgpack
--       array: per item i an array {token, response} (one argument, as in claim.lua).
-- Returns one string, a character per item: '1' when the caller held the lease (or
-- this is a replay of its own completion), else '0' and nothing is written for that item.
--
-- The done record keeps `token` so that a replayed call (client retry after a lost reply)
-- still answers 1; the journal and the lease fields go, and the req hash gets the
-- response's TTL so that both expire together.
local n = (#KEYS - 2) / 2
local leases, retry = KEYS[#KEYS - 1], KEYS[#KEYS]
local ttl, req_prefix = tonumber(ARGV[1]), ARGV[2]
local items = cmsgpack.unpack(ARGV[3])
local out = {}
local released = {} -- out of both zsets once, after the loop (each_chunk)
for i = 1, n do
  local req, resp = KEYS[2 * i - 1], KEYS[2 * i]
  local token, response = items[i][1], items[i][2]
  local h = redis.call('HMGET', req, 'state', 'token')
  if h[2] ~= token then
    out[i] = '0'
  elseif h[1] == 'pending' then
    local member = member_of(req, req_prefix)
    redis.call('SET', resp, response, 'EX', ttl)
    redis.call('HDEL', req, 'payload', 'topic', 'reply_to', 'corr', 'lease_until',
      'lease_ms', 'taken_at')
    redis.call('HSET', req, 'state', 'done')
    redis.call('EXPIRE', req, ttl)
    released[#released + 1] = member
    out[i] = '1'
  elseif h[1] == 'done' and redis.call('EXISTS', resp) == 1 then
    out[i] = '1'
  else
    out[i] = '0'
  end
end
each_chunk('ZREM', leases, released, 1000)
each_chunk('ZREM', retry, released, 1000)
return table.concat(out)
