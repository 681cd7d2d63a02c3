-- Extend the leases of records a worker is still working on (queued or computing),
-- never past `max_lease_ms` after the lease was taken (claim or take-over: `taken_at`).
--
-- KEYS: [1] leases zset, [1 + i] req hash of item i.
-- ARGV: [1] lease_ms, [2] max_lease_ms, [3] req key prefix `{p}req:`,
--       [3 + i] token of item i.
-- Returns per item 1 (renewed: the deadline is now min(now + lease_ms,
-- taken_at + max_lease_ms), still ahead) or 0 (nothing written: another token, done,
-- gone, parked for retry, or the lease has reached its maximum and is left to run out,
-- so the reaper re-runs it or it ends `exhausted`).
local leases = KEYS[1]
local lease_ms, max_lease_ms, req_prefix = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local n = #KEYS - 1
local now = now_ms()
local out = {}
for i = 1, n do
  local req = KEYS[1 + i]
  local member = member_of(req, req_prefix)
  local h = redis.call('HMGET', req, 'state', 'token', 'taken_at')
  out[i] = 0
  if h[1] == 'pending' and h[2] == ARGV[3 + i] and redis.call('ZSCORE', leases, member) then
    local taken_at = tonumber(h[3])
    if not taken_at then -- a lease from before taken_at existed: its bound starts now
      taken_at = now
      redis.call('HSET', req, 'taken_at', now)
    end
    local until_ms = math.min(now + lease_ms, taken_at + max_lease_ms)
    if until_ms > now then
      redis.call('HSET', req, 'lease_until', until_ms)
      redis.call('ZADD', leases, until_ms, member)
      out[i] = 1
    end
  end
end
return out
