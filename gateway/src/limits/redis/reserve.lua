-- Reserves `cost` in every limit, or in none: the Redis twin of store/memory.rs, step for step.
-- KEYS[i]: the counter of limit i, a hash of slot -> amount.
-- ARGV[1]: now in milliseconds, or "" for the server's clock (tests inject a clock).
-- ARGV[2]: cost.
-- ARGV[3i], ARGV[3i+1], ARGV[3i+2]: limit i's window kind ("s" sliding, "p" period), its
--   parameter (sliding: window seconds; period: seconds, or hourly/daily/weekly/monthly/yearly)
--   and its maximum.
-- Returns {1, slot_1, remaining_1, ...} when granted, {0, i, retry_after_secs} when limit i
-- refuses, {-1, i} when the cost exceeds limit i's maximum outright.

local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m > 2) and (m - 3) or (m + 9)
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = (mp < 10) and (mp + 3) or (mp - 9)
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end

-- The [start, end) in seconds of the period holding now_s (store/mod.rs: period_bounds).
local function period_bounds(period, now_s)
  local day = 86400
  local days = math.floor(now_s / day)
  if period == "hourly" then
    local start = math.floor(now_s / 3600) * 3600
    return start, start + 3600
  elseif period == "daily" then
    return days * day, (days + 1) * day
  elseif period == "weekly" then
    local monday = days - (days + 3) % 7
    return monday * day, (monday + 7) * day
  elseif period == "monthly" then
    local y, m = civil_from_days(days)
    local ny, nm = y, m + 1
    if m == 12 then ny, nm = y + 1, 1 end
    return days_from_civil(y, m, 1) * day, days_from_civil(ny, nm, 1) * day
  elseif period == "yearly" then
    local y = civil_from_days(days)
    return days_from_civil(y, 1, 1) * day, days_from_civil(y + 1, 1, 1) * day
  end
  local n = tonumber(period)
  local start = math.floor(now_s / n) * n
  return start, start + n
end

local now_ms = tonumber(ARGV[1])
if not now_ms then
  local time = redis.call('TIME')
  now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
local cost = tonumber(ARGV[2])

local plans = {}
for i = 1, #KEYS do
  local kind, param, max = ARGV[3 * i], ARGV[3 * i + 1], tonumber(ARGV[3 * i + 2])
  local slot, oldest, ttl, bucket_ms, buckets, end_ms
  if kind == "s" then
    local secs = tonumber(param)
    local bucket = math.max(1, math.ceil(secs / 60))
    bucket_ms = bucket * 1000
    buckets = math.ceil(secs / bucket)
    slot = math.floor(now_ms / bucket_ms)
    oldest = slot - buckets
    ttl = (buckets + 2) * bucket_ms
  else
    local start, finish = period_bounds(param, math.floor(now_ms / 1000))
    slot, oldest, end_ms = start, start, finish * 1000
    ttl = end_ms - now_ms + 60000
  end
  if cost > max then
    return {-1, i}
  end
  local fields = redis.call('HGETALL', KEYS[i])
  local counted, stale, used = {}, {}, 0
  for j = 1, #fields, 2 do
    local s, amount = tonumber(fields[j]), tonumber(fields[j + 1])
    if s >= oldest then
      used = used + amount
      counted[#counted + 1] = {s, amount}
    else
      stale[#stale + 1] = fields[j]
    end
  end
  if used + cost > max then
    local at_ms = end_ms
    if kind == "s" then
      table.sort(counted, function(a, b) return a[1] < b[1] end)
      local freed = 0
      at_ms = now_ms
      for _, c in ipairs(counted) do
        freed = freed + c[2]
        at_ms = (c[1] + buckets + 1) * bucket_ms
        if used - freed + cost <= max then break end
      end
    end
    return {0, i, math.max(1, math.ceil((at_ms - now_ms) / 1000))}
  end
  plans[i] = {slot, max - used - cost, ttl, stale}
end

local result = {1}
for i = 1, #KEYS do
  local plan = plans[i]
  if #plan[4] > 0 then
    redis.call('HDEL', KEYS[i], unpack(plan[4]))
  end
  redis.call('HINCRBY', KEYS[i], plan[1], cost)
  redis.call('PEXPIRE', KEYS[i], plan[3])
  result[#result + 1] = plan[1]
  result[#result + 1] = plan[2]
end
return result
