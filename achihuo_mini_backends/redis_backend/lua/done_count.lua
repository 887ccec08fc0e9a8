-- done_count: reads and repairs the done-set counter.
-- ARGV = 'get': returns the counter as stored (nil when there is none).
-- ARGV = 'sum': returns the number of names in the bucket KEYS after the fixed ones.
-- ARGV = 'set', seen, n: sets the counter to n if it still holds `seen` (the
-- unreadable value the recount started from). Returns 1 if set.
if ARGV[1] == 'get' then
  expect('dcount')
  return reply(redis.call('GET', K.dcount))
end
if ARGV[1] == 'sum' then
  local n = 0
  for i = FIXED_KEYS + 1, #KEYS do
    if redis.call('TYPE', KEYS[i])['ok'] == 'hash' then
      n = n + redis.call('HLEN', KEYS[i])
    end
  end
  return reply(n)
end
expect('dcount')
if redis.call('GET', K.dcount) ~= ARGV[2] then
  return reply(0)
end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', K.dcount, ARGV[3])
else
  redis.call('DEL', K.dcount)
end
return reply(1)
