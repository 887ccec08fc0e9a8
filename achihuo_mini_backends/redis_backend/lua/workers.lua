-- workers: 5 fields per registered worker: worker, alias, role, age_ms, info (JSON).
local now = now_ms()
local out = {}
local all = redis.call('HGETALL', K.workers)
for i = 1, #all, 2 do
  local r = cmsgpack.unpack(all[i + 1])
  out[#out + 1] = all[i]
  out[#out + 1] = r[1]
  out[#out + 1] = r[2]
  out[#out + 1] = math.max(now - r[4], 0)
  out[#out + 1] = redis.call('HGET', K.winfo, all[i]) or '{}'
end
return out
