-- leases: ARGV = worker. Every lease the worker holds, oldest task first, as
-- msgpack of a flat list with 5 fields per lease (like reserve):
-- id, payload, key ('' = unnamed), attempt, failures.
local ids = worker_lease_ids(ARGV[1])
table.sort(ids, function(a, b) return tonumber(a) < tonumber(b) end)
local out = {}
if #ids == 0 then
  return cmsgpack.pack(out)
end
local metas = hmget(K.meta, ids)
local payloads = hmget(K.tasks, ids)
for i, id in ipairs(ids) do
  if metas[i] then
    local attempt, failures, key = unpack_meta(metas[i])
    out[#out + 1] = id
    out[#out + 1] = payloads[i]
    out[#out + 1] = key
    out[#out + 1] = attempt
    out[#out + 1] = failures
  end
end
return cmsgpack.pack(out)
