-- recover: unregisters workers whose last heartbeat is older than their ttl, and
-- workers whose record is unreadable; then releases to the head every lease whose
-- worker is not registered, or whose token is unreadable (a lease entry that is not
-- a task id is quarantined).
-- A worker is not declared dead before the server has been up for its ttl: after a
-- Redis restart every worker gets a full ttl to reconnect. Returns tasks released.
expect('tasks', 'meta', 'ready', 'leased', 'pending', 'dead', 'wake', 'workers', 'winfo', 'aliases', 'mailbox')
local now = now_ms()
local uptime = tonumber(string.match(redis.call('INFO', 'server'), 'uptime_in_seconds:(%d+)')) * 1000
local all = redis.call('HGETALL', K.workers)
local gone = {}
for i = 1, #all, 2 do
  local r = parse_worker(all[i + 1])
  if not r then
    note('worker record of ' .. show(all[i]) .. ' is unreadable: worker removed, its leases released')
    gone[#gone + 1] = {all[i], nil}
  elseif uptime > r[3] and now - r[4] > r[3] then
    gone[#gone + 1] = {all[i], r}
  end
end
for _, g in ipairs(gone) do
  forget_worker(g[1], g[2])
end
local alive = {}
local ids = {}
local leased = redis.call('HGETALL', K.leased)
for i = 1, #leased, 2 do
  local id, token = leased[i], leased[i + 1]
  if not valid_id(id) then
    quarantine(id, 'lease entry is not a task id')
  else
    local _, worker = parse_token(token)
    if not worker then
      note('lease token ' .. show(token) .. ' of task ' .. id .. ' is unreadable: released')
      ids[#ids + 1] = id
    else
      if alive[worker] == nil then
        alive[worker] = redis.call('HEXISTS', K.workers, worker) == 1
      end
      if not alive[worker] then
        ids[#ids + 1] = id
      end
    end
  end
end
local n = release_ids(ids)
flush()
return reply(n)
