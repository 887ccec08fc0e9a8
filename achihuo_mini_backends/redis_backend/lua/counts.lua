-- counts: the loop's statistics in the `stats` hash (the CounterStore ability).
-- ARGV = 'add', name, value, ...: adds each value (max/... and min/... names keep the
--   largest or smallest); every value must be a decimal 64-bit integer, or nothing is written.
--   A stored field that is not an integer counts as absent (and is replaced), with a note.
-- ARGV = 'read', cursor, count: one HSCAN step; returns {next cursor, flat name/value list}.
-- ARGV = 'clear': deletes the hash.
expect('stats')
local op = ARGV[1]
if op == 'clear' then
  redis.call('DEL', K.stats)
  return reply(0)
end
if op == 'read' then
  return reply(redis.call('HSCAN', K.stats, ARGV[2], 'COUNT', ARGV[3]))
end
local function integer(v)
  return type(v) == 'string' and #v <= 20 and string.match(v, '^%-?%d+$') ~= nil
end
local names, values = {}, {}
for i = 2, #ARGV - 1, 2 do
  if not integer(ARGV[i + 1]) then
    return redis.error_reply('ERR achihuo counts: the value of ' .. show(ARGV[i]) .. ' is not an integer')
  end
  names[#names + 1] = ARGV[i]
  values[#values + 1] = ARGV[i + 1]
end
local old = {}
for first = 1, #names, CHUNK do
  local part = redis.call('HMGET', K.stats, unpack(names, first, math.min(first + CHUNK - 1, #names)))
  for j, v in ipairs(part) do
    old[first + j - 1] = v
  end
end
for i, name in ipairs(names) do
  local o = old[i]
  if o and not integer(o) then
    note('counter ' .. show(name) .. ' held ' .. show(o) .. ', not an integer: replaced')
    o = false
    redis.call('HDEL', K.stats, name)
  end
  local kind = string.sub(name, 1, 4)
  if kind == 'max/' or kind == 'min/' then
    local v = tonumber(values[i])
    if not o or (kind == 'max/' and v > tonumber(o)) or (kind == 'min/' and v < tonumber(o)) then
      redis.call('HSET', K.stats, name, values[i])
    end
  else
    redis.call('HINCRBY', K.stats, name, values[i])
  end
end
return reply(#names)
