-- hosts: per-host slots and turns (the HostSlots ability).
-- ARGV = worker, ttl ms, wait ms, then five per ask: slots, limit, release, turns, delay ms.
-- KEYS after the fixed ones: the host key of each ask, in order (a HASH each):
--   next       the host's next free request start (ms, server clock)
--   w:<worker> '<slots>:<holding ends, ms>:<waiting until, ms>'
-- A holding past its end counts for nothing; fields past both times are dropped; the key
-- expires when nothing in it is left. Returns five numbers per ask: slots granted, slots
-- held, workers holding or waiting, ms until the first turn, turns granted.
local MAX_AHEAD = 86400000  -- a next start further ahead is not one a loop could have written
local worker, ttl, wait = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local me = 'w:' .. worker
local now = now_ms()
local out = {}

local function parse_slot(s)
  if type(s) ~= 'string' or #s > 64 then
    return nil
  end
  local n, ends, until_ = string.match(s, '^(%d+):(%d+):(%d+)$')
  if not n or #n > 9 or #ends > 15 or #until_ > 15 then
    return nil
  end
  return tonumber(n), tonumber(ends), tonumber(until_)
end

for i = 1, math.floor((#ARGV - 3) / 5) do
  local key = KEYS[FIXED_KEYS + i]
  local b = 3 + (i - 1) * 5
  local slots, limit, release = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local turns, delay = tonumber(ARGV[b + 4]), tonumber(ARGV[b + 5])
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'none' and t ~= 'hash' then
    note('host key ' .. key .. ' held a ' .. t .. ': dropped')
    redis.call('DEL', key)
  end
  local all = redis.call('HGETALL', key)
  local others, workers, held, waiting, next_start, last = 0, 0, 0, 0, now, now
  local drop = {}
  for j = 1, #all, 2 do
    local f, v = all[j], all[j + 1]
    if f == 'next' then
      local n = parse_count(v)
      if n and n <= now + MAX_AHEAD then
        next_start = math.max(now, n)
      else
        note('host key ' .. key .. ': next start ' .. show(v) .. ' is unreadable: dropped')
        drop[#drop + 1] = f
      end
    elseif f == me then
      local n, ends, until_ = parse_slot(v)
      if n then
        held = ends > now and n or 0
        waiting = until_
      end
    elseif string.sub(f, 1, 2) == 'w:' then
      local n, ends, until_ = parse_slot(v)
      if not n then
        note('host key ' .. key .. ': holding ' .. show(v) .. ' is unreadable: dropped')
        drop[#drop + 1] = f
      else
        if ends <= now then
          n = 0
        end
        if n > 0 or until_ > now then
          others = others + n
          workers = workers + 1
          last = math.max(last, n > 0 and ends or 0, until_)
        else
          drop[#drop + 1] = f
        end
      end
    else
      drop[#drop + 1] = f
    end
  end
  held = held - math.min(math.max(release, 0), held)
  local granted = 0
  if slots > 0 then
    local free = slots
    if limit > 0 then
      free = math.max(limit - others - held, 0)
    end
    granted = math.min(slots, free)
    held = held + granted
    if granted < slots then
      waiting = now + wait
    else
      waiting = 0
    end
  end
  if held > 0 or waiting > now then
    workers = workers + 1
    redis.call('HSET', key, me, string.format('%d:%d:%d', held, now + ttl, waiting))
    last = math.max(last, held > 0 and now + ttl or 0, waiting)
  else
    drop[#drop + 1] = me
  end
  local start, got = 0, math.max(turns, 0)
  if got > 0 and delay > 0 then
    start = next_start - now
    next_start = next_start + got * delay
    next_start = math.ceil(next_start)  -- never closer than the delay
    redis.call('HSET', key, 'next', string.format('%d', next_start))
  end
  last = math.max(last, next_start)
  call_chunked('HDEL', key, drop)
  if last > now and redis.call('HLEN', key) > 0 then
    redis.call('PEXPIRE', key, last - now + 1000)
  else
    redis.call('DEL', key)
  end
  out[#out + 1] = granted
  out[#out + 1] = held
  out[#out + 1] = math.max(workers, 1)
  out[#out + 1] = start
  out[#out + 1] = got
end
return reply(out)
