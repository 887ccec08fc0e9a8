-- requeue: ARGV = limit (-1: all). Moves the oldest dead letters to the ready
-- tail as new tasks (failures reset, never skipped). Returns how many.
local limit = tonumber(ARGV[1])
if limit < 0 then
  limit = redis.call('LLEN', K.dead)
end
if limit == 0 then
  return 0
end
local records = redis.call('LPOP', K.dead, limit)
if not records then
  return 0
end
local tasks = {}
for i, record in ipairs(records) do
  local r = cmsgpack.unpack(record)
  tasks[i] = {r[5], r[3], 0, 0}
end
local pushed = insert(tasks, false)
wake(pushed)
return pushed
