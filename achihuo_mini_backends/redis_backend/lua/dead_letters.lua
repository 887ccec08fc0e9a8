-- dead_letters: ARGV = limit (> 0). Returns 5 fields per dead letter, oldest first:
-- id, payload, key ('' = unnamed), error, failures.
local out = {}
for _, record in ipairs(redis.call('LRANGE', K.dead, 0, tonumber(ARGV[1]) - 1)) do
  local r = cmsgpack.unpack(record)
  out[#out + 1] = r[1]
  out[#out + 1] = r[5]
  out[#out + 1] = r[3]
  out[#out + 1] = r[4]
  out[#out + 1] = r[2]
end
return out
