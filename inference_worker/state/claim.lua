-- Claim a group of (app, id) items atomically, in order (design sections 2 step 3, 6).
--
-- KEYS: for item i (1-based): KEYS[2i-1] = req hash, KEYS[2i] = resp string;
--       KEYS[2n+1] = leases zset, KEYS[2n+2] = retry zset.
-- ARGV: [1] lease_ms, [2] max_attempts, then per item i (base = 2 + 4(i-1)):
--       fp, payload, token, leases member.
-- Returns one entry per item: {outcome, attempts} or {'done', attempts, response}.
-- 'new' and 'exhausted' mean the caller's token now holds the lease; for 'exhausted'
-- only to complete the record with the `exhausted` error response (never run it).
--
-- "now" is the server's TIME so that workers with skewed clocks agree on lease expiry.
-- Tokens come from the caller (no randomness here: scripts must be deterministic).
-- A pending record holding the caller's own token means this exact call is being
-- replayed (the client retried after a lost reply): answer as the first run did.
-- A record waiting in the retry zset has lease_until = retry time + lease (see
-- schedule.lua), so the live-lease check answers 'in_progress' for it.
local n = (#KEYS - 2) / 2
local leases, retry = KEYS[#KEYS - 1], KEYS[#KEYS]
local lease_ms = tonumber(ARGV[1])
local max_attempts = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ms = now + lease_ms
local out = {}

local function lease(req, token, member, exhausted)
  redis.call('HSET', req, 'token', token, 'lease_until', until_ms, 'lease_ms', lease_ms,
    'exhausted', exhausted)
  redis.call('ZREM', retry, member)
  redis.call('ZADD', leases, until_ms, member)
end

local function take(req, fp, payload, token, member, attempts)
  redis.call('DEL', req)
  redis.call('HSET', req, 'state', 'pending', 'fp', fp, 'attempts', attempts,
    'payload', payload)
  lease(req, token, member, 0)
  return {'new', attempts}
end

for i = 1, n do
  local req, resp = KEYS[2 * i - 1], KEYS[2 * i]
  local b = 2 + 4 * (i - 1)
  local fp, payload, token, member = ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4]
  local h = redis.call('HMGET', req, 'state', 'fp', 'token', 'lease_until', 'attempts',
    'exhausted')
  local state, attempts = h[1], tonumber(h[5]) or 0
  local cached = false
  if state == 'done' then
    cached = redis.call('GET', resp)
    if not cached then state = false end -- response expired: the record counts as absent
  end
  if not state then
    out[i] = take(req, fp, payload, token, member, 1)
  elseif h[2] ~= fp then
    out[i] = {'conflict', attempts}
  elseif state == 'done' then
    out[i] = {'done', attempts, cached}
  elseif h[3] == token then
    out[i] = {h[6] == '1' and 'exhausted' or 'new', attempts}
  elseif tonumber(h[4]) > now then
    out[i] = {'in_progress', attempts}
  elseif attempts + 1 > max_attempts then
    lease(req, token, member, 1) -- attempts stay: this lease only closes the record
    out[i] = {'exhausted', attempts}
  else
    out[i] = take(req, fp, payload, token, member, attempts + 1)
  end
end
return out
