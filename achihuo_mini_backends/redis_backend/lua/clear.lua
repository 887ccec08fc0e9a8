-- clear: ARGV = 'queue' (tasks, leases, delays, pending counts, wake-ups) or 'dead'.
-- UNLINK frees big values in the background. When no task and no dead letter is
-- left, the id counter goes too (the next first id comes from TIME, above every
-- earlier one), so a cleared loop leaves no key.
if ARGV[1] == 'dead' then
  redis.call('UNLINK', K.dead)
else
  redis.call('UNLINK', K.tasks, K.meta, K.ready, K.delayed, K.leased, K.pending, K.wake)
end
if redis.call('EXISTS', K.tasks, K.dead) == 0 then
  redis.call('DEL', K.seq)
end
return reply(0)
