-- leases: ARGV = worker. Every lease the worker holds, oldest task first, as
-- msgpack of a flat list with 5 fields per lease (like reserve):
-- id, payload, key ('' = unnamed), attempt, failures.
-- The attempt is the token's; a task whose meta is unreadable is listed with key ''
-- and failures 0, one whose payload is missing or over MAX_PAYLOAD with payload ''
-- (releasing it lets reserve quarantine it).
local worker = ARGV[1]
local ids, attempts = {}, {}
local leased = redis.call('HGETALL', K.leased)
for i = 1, #leased, 2 do
  local attempt, holder = parse_token(leased[i + 1])
  if holder == worker and valid_id(leased[i]) then
    ids[#ids + 1] = leased[i]
    attempts[leased[i]] = attempt
  end
end
table.sort(ids, function(a, b) return tonumber(a) < tonumber(b) end)
local out = {}
local metas = hmget(K.meta, ids)
for i, id in ipairs(ids) do
  local _, failures, key = parse_meta(metas[i])
  if not key then
    note('task ' .. id .. ': metadata ' .. show(metas[i]) .. ' is unreadable: listed without key and failures')
  end
  local payload = ''
  if redis.call('HSTRLEN', K.tasks, id) <= MAX_PAYLOAD then
    payload = redis.call('HGET', K.tasks, id) or ''
  else
    note('task ' .. id .. ': payload over ' .. MAX_PAYLOAD .. ' bytes: listed without it')
  end
  out[#out + 1] = id
  out[#out + 1] = payload
  out[#out + 1] = key or ''
  out[#out + 1] = attempts[id]
  out[#out + 1] = failures or 0
end
return reply(cmsgpack.pack(out))
