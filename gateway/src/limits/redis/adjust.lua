-- Replaces a reservation by the real cost: adds ARGV[1] (actual - reserved) to slot ARGV[1 + i]
-- of counter KEYS[i], where that slot still exists (an expired counter is not brought back).
local delta = tonumber(ARGV[1])
for i = 1, #KEYS do
  local current = redis.call('HGET', KEYS[i], ARGV[1 + i])
  if current then
    redis.call('HSET', KEYS[i], ARGV[1 + i], math.max(0, tonumber(current) + delta))
  end
end
return {1}
