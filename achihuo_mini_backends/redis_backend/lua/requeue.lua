-- requeue: ARGV = count (> 0), byte budget. Moves the oldest `count` dead letters
-- (fewer, but at least one, when their records pass the budget) to the ready tail as
-- new tasks (failures reset, never skipped). An unreadable record is not
-- requeued: it moves to the tail of the dead letters (so a requeue of all of them in
-- steps meets it once) and stays there until `clear dead`.
-- Returns {requeued, examined, dead letters before this call}.
expect('seq', 'tasks', 'meta', 'ready', 'pending', 'dead', 'wake')
local length = redis.call('LLEN', K.dead)
local records = redis.call('LRANGE', K.dead, 0, tonumber(ARGV[1]) - 1)
local budget = tonumber(ARGV[2])
local tasks = {}
local examined, bytes = 0, 0
for _, record in ipairs(records) do
  if examined > 0 and bytes + #record > budget then
    break
  end
  examined = examined + 1
  bytes = bytes + #record
  local r = parse_dead(record)
  if r then
    tasks[#tasks + 1] = {r[5], r[3], 0, 0}
  else
    W.dead[#W.dead + 1] = record
    note('dead letter ' .. show(record) .. ' is unreadable: not requeued, moved to the end of the dead letters')
  end
end
W.trim_dead = examined
local pushed = insert(tasks, false)
flush()
return reply({pushed, examined, length})
