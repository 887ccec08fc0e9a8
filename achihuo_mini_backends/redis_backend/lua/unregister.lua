-- unregister: ARGV = worker. Frees its alias and mailbox and releases its leases
-- to the head (in id order). Returns how many tasks were released.
local worker = ARGV[1]
local record = redis.call('HGET', K.workers, worker)
if record then
  forget_worker(worker, cmsgpack.unpack(record))
end
local ids = {}
local leased = redis.call('HGETALL', K.leased)
for i = 1, #leased, 2 do
  if token_worker(leased[i + 1]) == worker then
    ids[#ids + 1] = leased[i]
  end
end
return release_ids(ids)
