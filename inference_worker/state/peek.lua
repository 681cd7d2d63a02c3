-- The members due in one zset (expired leases or due retries), oldest first, with their
-- scores, without taking them: on Redis Cluster the reaper peeks at every shard, picks
-- the `limit` oldest over all of them, and only then takes (takeover.lua) from the
-- shards that hold them, so one sweep still takes at most `limit`, oldest first.
-- Read-only; "due" is judged by this server's clock, as takeover.lua judges it.
--
-- KEYS: [1] the zset. ARGV: [1] limit.
-- Returns {member1, score1, member2, score2, ...}.
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms(), 'WITHSCORES', 'LIMIT', 0,
  tonumber(ARGV[1]))
