-- done_clear: KEYS after the fixed ones = every possible bucket key (and the old
-- SET of the previous layout). Unlinks them and the counter: the done set is empty.
for i = FIXED_KEYS + 1, #KEYS, CHUNK do
  redis.call('UNLINK', unpack(KEYS, i, math.min(i + CHUNK - 1, #KEYS)))
end
redis.call('UNLINK', K.dcount)
return 0
