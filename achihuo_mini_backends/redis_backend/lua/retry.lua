-- retry: ARGV = id, token, delay_ms triples. Each held lease counts one failure
-- and becomes ready at the tail when TIME + delay has passed. Returns how many.
local now = now_ms()
local n = 0
for i = 1, #ARGV, 3 do
  local id = ARGV[i]
  if redis.call('HGET', K.leased, id) == ARGV[i + 1] then
    redis.call('HDEL', K.leased, id)
    local attempt, failures, key = unpack_meta(redis.call('HGET', K.meta, id))
    redis.call('HSET', K.meta, id, pack_meta(attempt, failures + 1, key))
    redis.call('ZADD', K.delayed, now + math.max(tonumber(ARGV[i + 2]), 0), zmember(id))
    n = n + 1
  end
end
wake(n)
return n
