-- Take over records due in one zset: expired leases (reaper) or due retries (step 8).
--
-- KEYS: [1] source zset (leases or retry), [2] leases zset, [3] retry zset,
--       [4] receipt list `{p}takeover:{nonce}`.
-- ARGV: [1] req key prefix `{p}req:`, [2] lease_ms, [3] max_attempts, [4] limit,
--       [5] nonce (random, from the caller: scripts must be deterministic).
-- Returns one entry per record taken, oldest score first:
--       {member, token, attempts, exhausted (0|1), payload, topic, reply_to, corr}
--       (reply_to and corr are nil when the claim had none).
--
-- Each due member (score <= now, at most `limit`) leaves the source zset. A pending
-- record gets token `nonce.k` (k: its place in the reply), a fresh lease (leases zset,
-- lease_until, lease_ms, taken_at) and attempts + 1, or, when attempts + 1 > max_attempts,
-- keeps its count and is flagged exhausted (its holder closes it, never runs it). A member
-- whose record is gone or done is just dropped. Atomic, so two reapers never get the same
-- record.
--
-- Replay safety: the members taken are listed in the receipt (TTL = lease_ms); a replay
-- of this call (client retry after a lost reply) finds it and answers the records it
-- still holds, instead of taking others and stranding these until their lease expires.
--
-- The req keys are built here from the members, not passed in KEYS: on Redis Cluster the
-- prefix must carry a hash tag (e.g. `{iw}:`) so that every key lives in one slot.
local src, leases, retry, receipt = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local prefix, nonce = ARGV[1], ARGV[5]
local lease_ms, max_attempts, limit = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {}

local function journal(req)
  return redis.call('HMGET', req, 'payload', 'topic', 'reply_to', 'corr')
end

local function entry(member, token, attempts, exhausted, j)
  return {member, token, attempts, exhausted, j[1], j[2], j[3], j[4]}
end

local taken = redis.call('LRANGE', receipt, 0, -1)
if #taken > 0 then
  for k, member in ipairs(taken) do
    local token = nonce .. '.' .. k
    local req = prefix .. member
    local h = redis.call('HMGET', req, 'state', 'token', 'attempts', 'exhausted')
    if h[1] == 'pending' and h[2] == token then
      out[#out + 1] = entry(member, token, tonumber(h[3]), tonumber(h[4]) or 0, journal(req))
    end
  end
  return out
end

local now = now_ms()
local until_ms = now + lease_ms
local due = redis.call('ZRANGEBYSCORE', src, '-inf', now, 'LIMIT', 0, limit)
for _, member in ipairs(due) do
  local req = prefix .. member
  redis.call('ZREM', src, member)
  local h = redis.call('HMGET', req, 'state', 'attempts')
  local j = journal(req)
  if h[1] == 'pending' and j[1] then
    local attempts, exhausted = tonumber(h[2]) or 0, 0
    if attempts + 1 > max_attempts then exhausted = 1 else attempts = attempts + 1 end
    local token = nonce .. '.' .. (#out + 1) -- its position in the receipt
    redis.call('HSET', req, 'token', token, 'lease_until', until_ms, 'lease_ms', lease_ms,
      'attempts', attempts, 'exhausted', exhausted, 'taken_at', now)
    redis.call('ZREM', retry, member)
    redis.call('ZADD', leases, until_ms, member)
    redis.call('RPUSH', receipt, member)
    out[#out + 1] = entry(member, token, attempts, exhausted, j)
  end
end
if #out > 0 then redis.call('PEXPIRE', receipt, lease_ms) end
return out
