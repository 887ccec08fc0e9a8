-- reserve: ARGV = worker, limit, promote_max, byte budget.
-- Moves due delayed tasks to the ready tail, then leases up to `limit` from the head,
-- stopping early (after at least one) when the payloads would pass the byte budget.
-- A bad entry met on the way (not an id, unreadable meta, missing or oversized
-- payload) is quarantined and does not count; a duplicate ready entry of a task
-- that is leased or met already is dropped.
-- Returns msgpack of a flat list, 5 fields per lease:
-- id, payload, key ('' = unnamed), attempt, failures.
expect('tasks', 'meta', 'ready', 'delayed', 'leased', 'pending', 'dead')
local worker, limit, budget = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[4])
local candidates = redis.call('LRANGE', K.ready, 0, limit - 1)
local from_ready = #candidates
local later = {}  -- promoted beyond the limit: to the ready tail, after any promoted but not leased
if redis.call('EXISTS', K.delayed) == 1 then
  local due = redis.call('ZRANGEBYSCORE', K.delayed, '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[3]))
  for _, member in ipairs(due) do
    W.zrem[#W.zrem + 1] = member
    local id = member_id(member)
    if not id then
      quarantine(member, 'delayed entry is not a task id')
    elseif #candidates < limit then
      candidates[#candidates + 1] = id
    else
      later[#later + 1] = id
    end
  end
end
local ids = {}
for _, raw in ipairs(candidates) do
  if valid_id(raw) then
    ids[#ids + 1] = raw
  end
end
local metas = hmget(K.meta, ids)
local held = hmget(K.leased, ids)
local meta_of, held_of = {}, {}
for i, id in ipairs(ids) do
  meta_of[id] = metas[i]
  held_of[id] = held[i]
end
local out, seen, chosen = {}, {}, {}
local bytes, full = 0, false
for i, raw in ipairs(candidates) do
  if full then
    if i > from_ready then
      W.tail[#W.tail + 1] = raw  -- promoted, not leased: to the ready tail
    end
  elseif not valid_id(raw) then
    quarantine(raw, 'ready entry is not a task id')
  elseif seen[raw] or held_of[raw] then
    note('task ' .. raw .. ' was ready while leased or ready twice: extra ready entry dropped')
  else
    seen[raw] = true
    local attempt, failures, key = parse_meta(meta_of[raw])
    local size = redis.call('HSTRLEN', K.tasks, raw)
    if not attempt then
      quarantine(raw, 'task metadata ' .. show(meta_of[raw]) .. ' is unreadable')
    elseif size > MAX_PAYLOAD then
      quarantine(raw, 'task payload of ' .. size .. ' bytes is over the limit of ' .. MAX_PAYLOAD)
    elseif size == 0 and redis.call('HEXISTS', K.tasks, raw) == 0 then
      quarantine(raw, 'task payload is missing')
    elseif #out > 0 and bytes + size > budget then
      full = true
      seen[raw] = nil
      if i > from_ready then
        W.tail[#W.tail + 1] = raw
      end
    else
      bytes = bytes + size
      attempt = attempt + 1
      W.meta[#W.meta + 1] = raw
      W.meta[#W.meta + 1] = pack_meta(attempt, failures, key)
      W.leased[#W.leased + 1] = raw
      W.leased[#W.leased + 1] = attempt .. ':' .. worker
      chosen[#chosen + 1] = raw
      out[#out + 1] = raw
      out[#out + 1] = false  -- the payload, read below in one HMGET
      out[#out + 1] = key
      out[#out + 1] = attempt
      out[#out + 1] = failures
    end
  end
  if not full and i <= from_ready then
    W.trim_ready = i
  end
end
local payloads = hmget(K.tasks, chosen)
for i = 1, #chosen do
  out[5 * i - 3] = payloads[i]
end
for _, id in ipairs(later) do
  W.tail[#W.tail + 1] = id
end
flush()
return reply(cmsgpack.pack(out))
