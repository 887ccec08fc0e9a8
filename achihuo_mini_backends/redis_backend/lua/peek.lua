-- peek (notifier): {ready count, due time of the next delayed task in ms or -1, TIME in ms}.
local next_due = redis.call('ZRANGE', K.delayed, 0, 0, 'WITHSCORES')
local due = -1
if #next_due > 0 then
  due = math.floor(tonumber(next_due[2]))
end
return {redis.call('LLEN', K.ready), due, now_ms()}
