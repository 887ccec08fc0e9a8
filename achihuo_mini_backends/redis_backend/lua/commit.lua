-- commit: ARGV = msgpack list of {id, token, undone keys, done keys, children, lease key, ack
-- [, expiring: a flat list digest, ttl ms, ...]}; KEYS also hold the done-set bucket of every
-- undone, done, expiring and unique child key.
-- An entry applies only while its lease token matches (fencing); a fenced entry
-- writes nothing. In batch order, each entry: undone, done, the ack (the task's
-- pending count drops), children (unique against pending and done). With ack = 0
-- (one step of a commit split in bounded steps, see queue.py) the task stays leased,
-- and its own copy is not counted against its unique children (as if acked).
-- Returns {how many entries applied, how many children they enqueued}.
expect('seq', 'tasks', 'meta', 'ready', 'delayed', 'leased', 'pending', 'dcount', 'wake')
local batch = cmsgpack.unpack(ARGV[1])
local ids = {}
for i, c in ipairs(batch) do
  ids[i] = idstr(c[1])
end
local held = hmget(K.leased, ids)
local metas = hmget(K.meta, ids)
local applied, pushed, seen = 0, 0, {}
for i, c in ipairs(batch) do
  local id = ids[i]
  if held[i] == c[2] and not seen[id] then  -- a lease given twice is acked once
    seen[id] = true
    applied = applied + 1
    local _, _, key = parse_meta(metas[i])
    if not key then
      key = c[6]  -- the key the lease was given with
      note('task ' .. id .. ': metadata ' .. show(metas[i]) .. ' is unreadable: the lease\'s key is used')
    end
    done_put(c[3], false)
    done_put(c[4], true)
    if type(c[8]) == 'table' then
      done_expire(c[8])
    end
    if c[7] == 1 then
      pending_add(key, -1)
      pushed = pushed + insert(c[5], true)
      W.del[#W.del + 1] = id
    else
      pushed = pushed + insert(c[5], true, key)
    end
  end
end
flush()
return reply({applied, pushed})
