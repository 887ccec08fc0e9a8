-- send: ARGV = command, aliases... Appends the command once to the mailbox of each
-- alias's worker. Returns the aliases that exist, in the given order.
local command = ARGV[1]
local found, sent = {}, {}
for i = 2, #ARGV do
  local alias = ARGV[i]
  local worker = redis.call('HGET', K.aliases, alias)
  if worker then
    if not sent[worker] then
      sent[worker] = true
      local box = redis.call('HGET', K.mailbox, worker)
      local commands = {}
      if box then
        commands = cmsgpack.unpack(box)
      end
      commands[#commands + 1] = command
      redis.call('HSET', K.mailbox, worker, cmsgpack.pack(commands))
    end
    found[#found + 1] = alias
  end
end
return found
