-- recover: unregisters workers whose last heartbeat is older than their ttl, then
-- releases to the head every lease whose worker is not registered.
-- A worker is not declared dead before the server has been up for its ttl: after a
-- Redis restart every worker gets a full ttl to reconnect. Returns tasks released.
local now = now_ms()
local uptime = tonumber(string.match(redis.call('INFO', 'server'), 'uptime_in_seconds:(%d+)')) * 1000
local all = redis.call('HGETALL', K.workers)
for i = 1, #all, 2 do
  local r = cmsgpack.unpack(all[i + 1])
  if uptime > r[3] and now - r[4] > r[3] then
    forget_worker(all[i], r)
  end
end
return release_orphans()
