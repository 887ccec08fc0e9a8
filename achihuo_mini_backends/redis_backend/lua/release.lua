-- release: ARGV = id, token pairs. Held leases go back to the head in the given
-- order; no failure is counted. Returns how many were released.
local ids = {}
for i = 1, #ARGV, 2 do
  local id = ARGV[i]
  if redis.call('HGET', K.leased, id) == ARGV[i + 1] then
    redis.call('HDEL', K.leased, id)
    ids[#ids + 1] = id
  end
end
to_head(ids)
wake(#ids)
return #ids
