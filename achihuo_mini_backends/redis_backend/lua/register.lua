-- register: ARGV = worker, role, info (JSON), ttl_ms.
-- Claims the lowest free alias of the role ('m' for master, 's' otherwise) and
-- starts with an empty mailbox. Returns the alias.
local worker, role = ARGV[1], ARGV[2]
local old = redis.call('HGET', K.workers, worker)
if old then
  forget_worker(worker, cmsgpack.unpack(old))
end
local prefix = 's'
if role == 'master' then
  prefix = 'm'
end
local i = 1
while redis.call('HEXISTS', K.aliases, prefix .. i) == 1 do
  i = i + 1
end
local alias = prefix .. i
redis.call('HSET', K.aliases, alias, worker)
redis.call('HSET', K.workers, worker, cmsgpack.pack({alias, role, tonumber(ARGV[4]), now_ms()}))
redis.call('HSET', K.winfo, worker, ARGV[3])
return alias
