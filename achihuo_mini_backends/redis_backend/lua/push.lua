-- push: ARGV = msgpack list of tasks (see insert). Unique tasks are checked against
-- pending keys and this loop's done set (KEYS hold the bucket of every unique key).
-- Returns how many tasks were enqueued.
expect('seq', 'tasks', 'meta', 'ready', 'delayed', 'pending', 'dcount', 'wake')
local pushed = insert(cmsgpack.unpack(ARGV[1]), true)
flush()
return reply(pushed)
