-- release: ARGV = delay_ms, then id, token pairs. Held leases go back to the head in
-- the given order (delay_ms <= 0) or become ready at the tail after delay_ms; no
-- failure is counted either way. Returns how many were released.
expect('ready', 'delayed', 'leased', 'wake')
local delay = tonumber(ARGV[1])
local ids, tokens = {}, {}
for i = 2, #ARGV, 2 do
  ids[#ids + 1] = ARGV[i]
  tokens[#tokens + 1] = ARGV[i + 1]
end
local held = hmget(K.leased, ids)
local released, seen = {}, {}
for i, id in ipairs(ids) do
  if held[i] == tokens[i] and not seen[id] then
    seen[id] = true
    released[#released + 1] = id
    W.del_leased[#W.del_leased + 1] = id
  end
end
if delay > 0 then
  local due = now_ms() + delay
  for _, id in ipairs(released) do
    W.zadd[#W.zadd + 1] = due
    W.zadd[#W.zadd + 1] = zmember(id)
  end
elseif #released > 0 then
  W.heads[1] = released
end
W.wake = #released
flush()
return reply(#released)
