-- reserve: ARGV = worker, limit, promote_max.
-- Moves due delayed tasks to the ready tail, then leases up to `limit` from the head.
-- Returns msgpack of a flat list, 5 fields per lease:
-- id, payload, key ('' = unnamed), attempt, failures.
local worker, limit = ARGV[1], tonumber(ARGV[2])
if redis.call('EXISTS', K.delayed) == 1 then
  local due = redis.call('ZRANGEBYSCORE', K.delayed, '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[3]))
  if #due > 0 then
    local ids = {}
    for i, member in ipairs(due) do
      ids[i] = idstr(tonumber(member))
    end
    call_chunked('RPUSH', K.ready, ids)
    redis.call('ZREMRANGEBYRANK', K.delayed, 0, #due - 1)
  end
end
local out = {}
local ids = redis.call('LPOP', K.ready, limit)
if not ids then
  return cmsgpack.pack(out)
end
local metas = hmget(K.meta, ids)
local payloads = hmget(K.tasks, ids)
local new_metas, tokens = {}, {}
for i, id in ipairs(ids) do
  if metas[i] then
    local attempt, failures, key = unpack_meta(metas[i])
    attempt = attempt + 1
    new_metas[#new_metas + 1] = id
    new_metas[#new_metas + 1] = pack_meta(attempt, failures, key)
    tokens[#tokens + 1] = id
    tokens[#tokens + 1] = attempt .. ':' .. worker
    out[#out + 1] = id
    out[#out + 1] = payloads[i]
    out[#out + 1] = key
    out[#out + 1] = attempt
    out[#out + 1] = failures
  end
end
call_chunked('HSET', K.meta, new_metas)
call_chunked('HSET', K.leased, tokens)
return cmsgpack.pack(out)
