-- workers: 5 fields per registered worker: worker, alias, role, age_ms, info (JSON;
-- '' when longer than MAX_INFO). A worker whose record is unreadable is skipped
-- (its next heartbeat or a recover removes it).
expect('workers', 'winfo')
local now = now_ms()
local out = {}
local all = redis.call('HGETALL', K.workers)
for i = 1, #all, 2 do
  local r = parse_worker(all[i + 1])
  if r then
    local info = redis.call('HGET', K.winfo, all[i]) or '{}'
    if #info > MAX_INFO then
      info = ''
    end
    out[#out + 1] = all[i]
    out[#out + 1] = r[1]
    out[#out + 1] = r[2]
    out[#out + 1] = math.max(now - r[4], 0)
    out[#out + 1] = info
  else
    note('worker record of ' .. show(all[i]) .. ' is unreadable: not listed (recover removes it)')
  end
end
return reply(out)
