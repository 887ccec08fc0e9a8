-- bury: ARGV = id, token, error triples. Each held lease counts one failure and
-- moves to the tail of the dead letters (its key is no longer pending).
-- Returns how many were buried.
local n = 0
for i = 1, #ARGV, 3 do
  local id = ARGV[i]
  if redis.call('HGET', K.leased, id) == ARGV[i + 1] then
    redis.call('HDEL', K.leased, id)
    local _, failures, key = unpack_meta(redis.call('HGET', K.meta, id))
    local payload = redis.call('HGET', K.tasks, id)
    redis.call('HDEL', K.tasks, id)
    redis.call('HDEL', K.meta, id)
    pending_drop(key)
    redis.call('RPUSH', K.dead, cmsgpack.pack({id, failures + 1, key, ARGV[i + 2], payload}))
    n = n + 1
  end
end
return n
