-- peek (notifier): {ready count, due time of the next delayed task in ms or -1, TIME in ms}.
local next_due = redis.call('ZRANGE', K.delayed, 0, 0, 'WITHSCORES')
local now = now_ms()
local due = -1
if #next_due > 0 then
  due = math.max(math.min(math.floor(tonumber(next_due[2]) or 0), now + 1e12), 0)
end
return reply({redis.call('LLEN', K.ready), due, now})
