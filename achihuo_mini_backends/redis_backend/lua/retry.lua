-- retry: ARGV = id, token, delay_ms, failures, key quintuples (failures and key as the
-- lease has them). Each held lease counts one failure and becomes ready at the tail
-- when TIME + delay has passed. A task whose meta is unreadable gets it back from
-- its lease. Returns how many.
expect('meta', 'delayed', 'leased', 'wake')
local now = now_ms()
local ids, held, metas, from_lease = lease_quintuples()
local n, seen = 0, {}
for j, id in ipairs(ids) do
  local i = 5 * (j - 1) + 1
  if held[j] == ARGV[i + 1] and not seen[id] then
    seen[id] = true
    local attempt, failures, key = parse_meta(metas[j])
    if not attempt then
      attempt = parse_token(ARGV[i + 1])
      failures, key = from_lease(j)
      note('task ' .. id .. ': metadata ' .. show(metas[j]) .. ' is unreadable: rebuilt from the lease')
    end
    W.del_leased[#W.del_leased + 1] = id
    W.meta[#W.meta + 1] = id
    W.meta[#W.meta + 1] = pack_meta(attempt, failures + 1, key)
    W.zadd[#W.zadd + 1] = now + math.max(tonumber(ARGV[i + 2]), 0)
    W.zadd[#W.zadd + 1] = zmember(id)
    n = n + 1
  end
end
W.wake = n
flush()
return reply(n)
