-- unregister: ARGV = worker. Frees its alias and mailbox and releases its leases
-- to the head (in id order). Returns how many tasks were released.
local worker = ARGV[1]
local record = redis.call('HGET', K.workers, worker)
if record then
  forget_worker(worker, cmsgpack.unpack(record))
end
return release_ids(worker_lease_ids(worker))
