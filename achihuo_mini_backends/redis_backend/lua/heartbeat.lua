-- heartbeat: ARGV = worker, info (JSON), ttl_ms.
-- Returns {0} for an unknown worker, else {1, commands...} (the mailbox is emptied).
local worker = ARGV[1]
local record = redis.call('HGET', K.workers, worker)
if not record then
  return {0}
end
local r = cmsgpack.unpack(record)
r[3] = tonumber(ARGV[3])
r[4] = now_ms()
redis.call('HSET', K.workers, worker, cmsgpack.pack(r))
redis.call('HSET', K.winfo, worker, ARGV[2])
local out = {1}
local box = redis.call('HGET', K.mailbox, worker)
if box then
  redis.call('HDEL', K.mailbox, worker)
  for _, command in ipairs(cmsgpack.unpack(box)) do
    out[#out + 1] = command
  end
end
return out
