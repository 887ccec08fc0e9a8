-- send: ARGV = command, aliases... Appends the command once to the mailbox of each
-- alias's worker, when that worker is registered under that alias. An unreadable
-- mailbox is replaced. Returns the aliases that exist, in the given order.
expect('workers', 'aliases', 'mailbox')
local command = ARGV[1]
local found, sent = {}, {}
for i = 2, #ARGV do
  local alias = ARGV[i]
  local worker = redis.call('HGET', K.aliases, alias)
  local r = worker and parse_worker(redis.call('HGET', K.workers, worker))
  if r and r[1] == alias then
    if not sent[worker] then
      sent[worker] = true
      local box = redis.call('HGET', K.mailbox, worker)
      local commands = {}
      if box then
        commands = parse_mailbox(worker, box)
      end
      commands[#commands + 1] = command
      redis.call('HSET', K.mailbox, worker, cmsgpack.pack(commands))
    end
    found[#found + 1] = alias
  elseif worker then
    note('alias ' .. show(alias) .. ' names ' .. show(worker) .. ', which is not registered under it: not sent')
  end
end
return reply(found)
