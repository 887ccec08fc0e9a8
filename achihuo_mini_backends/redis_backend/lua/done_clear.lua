-- done_clear: ARGV = 'last' on the last step. KEYS after the fixed ones = one step's
-- share of every possible bucket key (and the old SET of the previous layout).
-- Unlinks them; the last step unlinks the counter too.
for i = FIXED_KEYS + 1, #KEYS, CHUNK do
  redis.call('UNLINK', unpack(KEYS, i, math.min(i + CHUNK - 1, #KEYS)))
end
if ARGV[1] == 'last' then
  redis.call('UNLINK', K.dcount)
end
return reply(0)
