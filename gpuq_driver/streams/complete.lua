-- complete.lua: StreamConsumer.complete's script (gpuq_driver/streams/consumer.py), loaded with
-- importlib.resources and run with EVALSHA (redis-py's register_script).
-- KEYS[1] source stream, KEYS[2] result stream.  ARGV[1] group, ARGV[2] result stream MAXLEN (~),
-- ARGV[3] the entries' result frames back to back, ARGV[4..] the entry ids.
-- XACK returns 1 for an entry still pending in the group: those are published; the others had
-- been acked (and published) by another consumer: their positions (0-based) are listed under
-- "dup" so readers skip their frames.  One result entry per call, fields ids / r / dup: every
-- large value is one Lua string (Lua 5.1 interns every string, with a hash that samples at most 32 bytes of it, so thousands of
-- similar result strings collide: 0.6 s for 4,096 frames of 512 B, measured on the H200 host).
-- Per-id XACK costs 0.6 µs (Redis 6.2) / 1.2 µs (7.0) an entry; XCLAIM JUSTID or XPENDING as the
-- check cost more (benchmarks/NOTES.md).  A script runs atomically; Redis checks memory before its
-- first write, and XLEN fails on a result key of the wrong type before anything is acked.
redis.call('XLEN', KEYS[2])
local dup = {}
for i = 4, #ARGV do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 0 then dup[#dup + 1] = i - 4 end
end
local n = #ARGV - 3
if #dup == n then return 0 end
local ids = table.concat(ARGV, ',', 4, #ARGV)
if #dup == 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'ids', ids, 'r', ARGV[3])
else
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'ids', ids, 'r', ARGV[3], 'dup', table.concat(dup, ','))
end
return n - #dup
