-- Claim a group of (app, id) items atomically, in order (design sections 2 step 3, 6).
--
-- KEYS: for item i (1-based): KEYS[2i-1] = req hash, KEYS[2i] = resp string;
--       KEYS[2n+1] = leases zset, KEYS[2n+2] = retry zset.
-- ARGV: [1] lease_ms, [2] max_attempts, [3] nonce, [4] req key prefix `{p}req:`,
--       [5] the items, one msgpack array: per item i an array {index, fp, payload, topic,
--       reply_to, correlation}. reply_to and correlation are '' when absent, else '='
--       followed by the value. `index` is the item's place in the caller's whole group
--       (0-based): on Redis Cluster a group is split into one call per shard, and the
--       tokens must still name the place in the group. One packed argument instead of six
--       per item: the client packs and the server parses it in C (cmsgpack), where
--       hundreds of separate arguments cost the worker ~10 us of Python per item.
-- Returns one msgpack array, one entry per item: {outcome, attempts} or
-- {'done', attempts, response}.
-- 'new' and 'exhausted' mean the caller now holds the lease under token
-- `nonce .. ':' .. index`; for 'exhausted' only to complete the record with the
-- `exhausted` error response (never run it).
--
-- The token is built from the caller's nonce (scripts must be deterministic: no
-- randomness here). A pending record holding the very token this item would get means
-- this call is being replayed (the caller retried after a lost reply): it answers as the
-- first run did (same token, same attempts, nothing counted twice).
-- A record waiting in the retry zset has lease_until = retry time + lease (see
-- schedule.lua), so the live-lease check answers 'in_progress' for it.
-- The journal is the raw payload as its own field with topic, reply_to and corr beside
-- it; `taken_at` (when this token took the lease) bounds renewals (renew.lua).
local n = (#KEYS - 2) / 2
local leases, retry = KEYS[#KEYS - 1], KEYS[#KEYS]
local lease_ms, max_attempts = tonumber(ARGV[1]), tonumber(ARGV[2])
local nonce, req_prefix = ARGV[3], ARGV[4]
local items = cmsgpack.unpack(ARGV[5])
local now = now_ms()
local until_ms = now + lease_ms
local out = {}

-- Members leased by this call: out of the retry zset, into the leases zset, both once
-- for the whole call after the loop (each_chunk).
local unretry, leased = {}, {}
local function leased_member(member)
  unretry[#unretry + 1] = member
  leased[#leased + 1] = until_ms
  leased[#leased + 1] = member
end

local function lease(req, token, member, exhausted)
  redis.call('HSET', req, 'token', token, 'lease_until', until_ms, 'lease_ms', lease_ms,
    'exhausted', exhausted, 'taken_at', now)
  leased_member(member)
end

-- A fresh pending record under a new lease: one HSET with every field (the journal and
-- the lease), after a DEL only when a record was there (`existed`: a retake, or a done
-- record whose response expired), so no field of an earlier run survives.
local function take(req, item, token, member, attempts, existed)
  if existed then redis.call('DEL', req) end
  local fields = {'state', 'pending', 'fp', item[2], 'attempts', attempts,
    'payload', item[3], 'topic', item[4], 'token', token, 'lease_until', until_ms,
    'lease_ms', lease_ms, 'exhausted', 0, 'taken_at', now}
  local reply_to, corr = item[5], item[6]
  if reply_to ~= '' then
    fields[#fields + 1] = 'reply_to'
    fields[#fields + 1] = string.sub(reply_to, 2)
  end
  if corr ~= '' then
    fields[#fields + 1] = 'corr'
    fields[#fields + 1] = string.sub(corr, 2)
  end
  redis.call('HSET', req, unpack(fields))
  leased_member(member)
  return {'new', attempts}
end

for i = 1, n do
  local req, resp = KEYS[2 * i - 1], KEYS[2 * i]
  local item = items[i]
  local fp, token, member = item[2], nonce .. ':' .. item[1], member_of(req, req_prefix)
  local h = redis.call('HMGET', req, 'state', 'fp', 'token', 'lease_until', 'attempts',
    'exhausted')
  local state, attempts = h[1], tonumber(h[5]) or 0
  -- Any of these fields means a record is there (every script that writes one sets
  -- some of them); none means the key is absent and needs no DEL before `take`.
  local existed = h[1] or h[2] or h[3] or h[4] or h[5] or h[6]
  local cached = false
  if state == 'done' then
    cached = redis.call('GET', resp)
    if not cached then state = false end -- response expired: the record counts as absent
  end
  if not state then
    out[i] = take(req, item, token, member, 1, existed)
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
    out[i] = take(req, item, token, member, attempts + 1, true)
  end
end
each_chunk('ZREM', retry, unretry, 1000)
each_chunk('ZADD', leases, leased, 1000)
return cmsgpack.pack(out)
