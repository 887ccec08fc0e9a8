-- unregister: ARGV = worker. Frees its alias and mailbox and releases its leases
-- to the head (in id order). Returns how many tasks were released.
expect('tasks', 'meta', 'ready', 'leased', 'pending', 'dead', 'wake', 'workers', 'winfo', 'aliases', 'mailbox')
local worker = ARGV[1]
local record = redis.call('HGET', K.workers, worker)
local ids = worker_lease_ids(worker)
if record then
  forget_worker(worker, parse_worker(record))
end
local n = release_ids(ids)
flush()
return reply(n)
