-- heartbeat: ARGV = worker, info (JSON), ttl_ms.
-- Returns {0} for an unknown worker, else {1, commands...} (the mailbox is emptied).
-- A worker whose record is unreadable is forgotten and told it is unknown: it
-- registers again (and recover releases the leases of its old incarnation).
expect('workers', 'winfo', 'aliases', 'mailbox')
local worker = ARGV[1]
local record = redis.call('HGET', K.workers, worker)
if not record then
  return reply({0})
end
local r = parse_worker(record)
if not r then
  note('worker record of ' .. show(worker) .. ' is unreadable: removed, the worker registers again')
  forget_worker(worker, nil)
  return reply({0})
end
local out = {1}
local box = redis.call('HGET', K.mailbox, worker)
if box then
  for _, command in ipairs(parse_mailbox(worker, box)) do
    out[#out + 1] = command
  end
  redis.call('HDEL', K.mailbox, worker)
end
r[3] = tonumber(ARGV[3])
r[4] = now_ms()
redis.call('HSET', K.workers, worker, cmsgpack.pack(r))
redis.call('HSET', K.winfo, worker, ARGV[2])
return reply(out)
