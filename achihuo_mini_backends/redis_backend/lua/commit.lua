-- commit: ARGV = msgpack list of {id, token, undone keys, done keys, children};
-- KEYS also hold the done-set bucket of every undone, done and unique child key.
-- A commit applies only while its lease token matches (fencing); a fenced commit
-- writes nothing. In batch order, each commit: ack (its pending count drops),
-- undone, done, children (unique against pending and done). Returns how many applied.
local batch = cmsgpack.unpack(ARGV[1])
local ids = {}
for i, c in ipairs(batch) do
  ids[i] = idstr(c[1])
end
local held = hmget(K.leased, ids)
local metas = hmget(K.meta, ids)
local acked, seen = {}, {}
local pushed = 0
for i, c in ipairs(batch) do
  local id = ids[i]
  if held[i] == c[2] and not seen[id] then  -- a lease given twice is acked once
    seen[id] = true
    acked[#acked + 1] = id
    if metas[i] then
      local _, _, key = unpack_meta(metas[i])
      pending_drop(key)
    end
    done_remove(c[3])
    done_add(c[4])
    pushed = pushed + insert(c[5], true)
  end
end
call_chunked('HDEL', K.leased, acked)
call_chunked('HDEL', K.tasks, acked)
call_chunked('HDEL', K.meta, acked)
wake(pushed)
return #acked
