-- dead_letters: ARGV = start, count (> 0), byte budget. Reads the dead letters from
-- index `start`, oldest first, stopping early (after at least one) at the budget.
-- An unreadable record is skipped (and left where it is: `clear dead` removes it).
-- Returns {examined, flat list of 5 fields per readable letter:
-- id, payload, key ('' = unnamed), error, failures; the number of dead letters}.
local start, count, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
local examined, bytes = 0, 0
for _, record in ipairs(redis.call('LRANGE', K.dead, start, start + count - 1)) do
  if examined > 0 and bytes + #record > budget then
    break
  end
  examined = examined + 1
  bytes = bytes + #record
  local r = parse_dead(record)
  if r then
    out[#out + 1] = idstr(r[1])
    out[#out + 1] = r[5]
    out[#out + 1] = r[3]
    out[#out + 1] = r[4]
    out[#out + 1] = r[2]
  else
    note('dead letter at index ' .. (start + examined - 1) .. ' ' .. show(record) ..
         ' is unreadable: skipped (clear dead removes it)')
  end
end
return reply({examined, out, redis.call('LLEN', K.dead)})
