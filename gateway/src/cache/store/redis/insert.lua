-- Stores one cache entry, keeps its partition within its bound and tells every instance, in one
-- atomic step on the server's clock.
-- KEYS[1]: the entry's hash; KEYS[2]: the partition's zset of entry ids scored by expiry (ms);
-- KEYS[3]: the stream of index changes that every instance follows.
-- ARGV[1]: entry id; ARGV[2]: partition; ARGV[3]: vector (little-endian f32); ARGV[4]: prompt;
-- ARGV[5]: answer; ARGV[6]: TTL in ms (> 0); ARGV[7]: most entries in the partition;
-- ARGV[8]: approximate length the stream is trimmed to; ARGV[9]: entry key prefix (+ id = hash).
-- Returns {expiry ms, {ids evicted}}.
-- Entries' hashes are named from their ids here (evictions): fine on a single Redis, not on a
-- cluster, which the cache does not support.

local id, partition, ttl, max = ARGV[1], ARGV[2], tonumber(ARGV[6]), tonumber(ARGV[7])
local stream_len, prefix = ARGV[8], ARGV[9]
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local expiry = now + ttl

redis.call('HSET', KEYS[1], 'p', partition, 'v', ARGV[3], 'q', ARGV[4], 'a', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ttl)

-- Expired ids first (their hashes expire on their own), then the bound: the soonest to expire go.
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZADD', KEYS[2], expiry, id)
if redis.call('PTTL', KEYS[2]) < ttl then
  -- The zset lives as long as its longest-lived entry, so abandoned partitions leave nothing.
  redis.call('PEXPIRE', KEYS[2], ttl)
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', stream_len, '*', 'op', 'add', 'id', id, 'p', partition, 'x', expiry)

local evicted = {}
local over = redis.call('ZCARD', KEYS[2]) - max
if over > 0 then
  local popped = redis.call('ZPOPMIN', KEYS[2], over)
  for i = 1, #popped, 2 do
    local gone = popped[i]
    redis.call('DEL', prefix .. gone)
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', stream_len, '*', 'op', 'del', 'id', gone, 'p', partition)
    evicted[#evicted + 1] = gone
  end
end
return {expiry, evicted}
