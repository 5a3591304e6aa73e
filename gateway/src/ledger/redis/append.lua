-- Appends one call's usage, once per request id.
-- KEYS[1]: the request id's marker; KEYS[2]: the hour's hash; KEYS[3]: the index of hours (zset).
-- ARGV[1]: the hour (seconds since the epoch); ARGV[2]: the bucket's JSON [subscription, team,
-- model, api]; then pairs of metric name and amount.
-- Returns 1 if counted, 0 if the request id was counted already.
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', 86400) then
  return 0
end
for i = 3, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[2], ARGV[i] .. '|' .. ARGV[2], ARGV[i + 1])
end
redis.call('ZADD', KEYS[3], ARGV[1], ARGV[1])
return 1
