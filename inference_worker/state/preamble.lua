#!lua
-- The head of every state script; scripts.py puts it in front of each one's body.
--
-- The `#!lua` shebang (Redis >= 7) makes the server check, before the script runs, that
-- it may write (OOM under `noeviction`, MISCONF after a failed save, READONLY on a
-- replica), so such an error never leaves a group half written.
--
-- "now" is the server's TIME in ms, so workers with skewed clocks agree on deadlines.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A req key is `{prefix}req:{member}`: its zset member is the rest after the prefix,
-- so callers send each member once, inside its key.
local function member_of(req, req_prefix)
  return string.sub(req, #req_prefix + 1)
end

-- `cmd key args...` over a list of arguments, a chunk of `step` at a time (Lua's unpack
-- is bounded by its C stack): the zset updates of a whole group in one command or a few,
-- instead of one per item. Scripts run atomically, so doing them after the loop is
-- invisible to every other call; within a script nothing reads those zsets.
local function each_chunk(cmd, key, args, step)
  for first = 1, #args, step do
    redis.call(cmd, key, unpack(args, first, math.min(first + step - 1, #args)))
  end
end
