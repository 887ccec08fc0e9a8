-- bury: ARGV = id, token, error, failures, key quintuples (failures and key as the
-- lease has them). Each held lease counts one failure and moves to the tail of the
-- dead letters (its key is no longer pending). Returns how many were buried.
expect('tasks', 'meta', 'leased', 'pending', 'dead')
local ids, held, metas, from_lease = lease_quintuples()
local n, seen = 0, {}
for j, id in ipairs(ids) do
  local i = 5 * (j - 1) + 1
  if held[j] == ARGV[i + 1] and not seen[id] then
    seen[id] = true
    local _, failures, key = parse_meta(metas[j])
    if not failures then
      failures, key = from_lease(j)
      note('task ' .. id .. ': metadata ' .. show(metas[j]) .. ' is unreadable: the lease\'s is used')
    end
    local payload = ''
    local size = redis.call('HSTRLEN', K.tasks, id)
    if size <= MAX_PAYLOAD then
      payload = redis.call('HGET', K.tasks, id) or ''
    end
    pending_add(key, -1)
    W.del[#W.del + 1] = id
    W.dead[#W.dead + 1] = cmsgpack.pack({tonumber(id), failures + 1, key, ARGV[i + 2], payload})
    n = n + 1
  end
end
flush()
return reply(n)
