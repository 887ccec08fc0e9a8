-- register: ARGV = worker, role, info (JSON), ttl_ms.
-- Claims the lowest free alias of the role ('m' for master, 's' otherwise: the
-- policy of achihuo_mini.backend_kit.lowest_free_alias) and starts with an empty
-- mailbox. An alias is held by a registered worker whose record names it; an
-- unreadable record holds none, and an `aliases` entry left by no registered
-- worker is taken over. Returns the alias.
expect('workers', 'winfo', 'aliases', 'mailbox')
local worker, role = ARGV[1], ARGV[2]
local all = redis.call('HGETALL', K.workers)
local taken = {}
local mine, had = nil, false
for i = 1, #all, 2 do
  local r = parse_worker(all[i + 1])
  if all[i] == worker then
    mine, had = r, true
  elseif r then
    taken[r[1]] = true
  else
    note('worker record of ' .. show(all[i]) .. ' is unreadable: its alias is free (recover removes it)')
  end
end
if had then
  forget_worker(worker, mine)
end
local prefix = 's'
if role == 'master' then
  prefix = 'm'
end
local i = 1
while taken[prefix .. i] do
  i = i + 1
end
local alias = prefix .. i
redis.call('HSET', K.aliases, alias, worker)
redis.call('HSET', K.workers, worker, cmsgpack.pack({alias, role, tonumber(ARGV[4]), now_ms()}))
redis.call('HSET', K.winfo, worker, ARGV[3])
return reply(alias)
