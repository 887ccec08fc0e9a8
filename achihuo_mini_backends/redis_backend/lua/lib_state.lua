-- Shared helpers of the achihuo_mini Redis backend, part 2 (after lib.lua): what a
-- script has read and decided in phase 1 (caches of pending counts and done-set
-- names, new tasks, leases, acks, dead letters), and flush(), which writes it in
-- phase 2. See lib.lua for the layout and the two phases.

-- -- writes decided in phase 1, applied by flush() ---------------------------------------

local W = {
  trim_ready = 0,              -- ids popped from the ready head (reserve)
  trim_dead = 0,               -- records popped from the dead head (requeue)
  del = {},                    -- ids whose task, meta and lease go (acked, buried, quarantined)
  del_leased = {},             -- ids whose lease goes (released, retried)
  tasks = {}, meta = {}, leased = {},  -- field, value pairs to set
  tail = {}, heads = {},       -- ids to the ready tail; batches of ids to the head
  zadd = {}, zrem = {},        -- delayed: score, member pairs; members
  dead = {},                   -- records to the dead tail
  seq = nil,                   -- the last id handed out, when ids were
  wake = 0,                    -- tasks made ready or delayed
}

-- redis.call(cmd, key, items...) in chunks (items may be field/value or score/member
-- pairs: CHUNK is even).
local function call_chunked(cmd, key, items)
  for i = 1, #items, CHUNK do
    redis.call(cmd, key, unpack(items, i, math.min(i + CHUNK - 1, #items)))
  end
end

-- HMGET in chunks; missing fields are false.
local function hmget(key, fields)
  local out = {}
  for i = 1, #fields, CHUNK do
    local part = redis.call('HMGET', key, unpack(fields, i, math.min(i + CHUNK - 1, #fields)))
    for j = 1, #part do
      out[#out + 1] = part[j]
    end
  end
  return out
end

-- retry and bury: ARGV in quintuples (id, token, delay or error, failures, key as the
-- lease has them). Returns the ids, what `leased` and `meta` hold for them, and a function
-- giving quintuple j's failures and key from the lease (for a task whose meta is unreadable).
local function lease_quintuples()
  local ids = {}
  for i = 1, #ARGV, 5 do
    ids[#ids + 1] = ARGV[i]
  end
  local function from_lease(j)
    local i = 5 * (j - 1) + 1
    return math.min(tonumber(ARGV[i + 3]), MAX_U32 - 1), ARGV[i + 4]
  end
  return ids, hmget(K.leased, ids), hmget(K.meta, ids), from_lease
end

local next_id_value = nil

local function next_id()
  if not next_id_value then
    local raw = redis.call('GET', K.seq)
    if raw and valid_id(raw) then
      next_id_value = tonumber(raw)
    else
      if raw then
        note('task id counter ' .. show(raw) .. ' is unreadable: restarted from the server clock')
      end
      next_id_value = first_id()
    end
  end
  next_id_value = next_id_value + 1
  W.seq = next_id_value
  return idstr(next_id_value)
end

-- Pending counts, read once per key and written by flush. A stored count that is
-- not a count (not digits, negative, too long) counts as 0: it blocks nothing, and
-- the next write of that key replaces it (a task may then run twice; none is lost).
local pend, pend_old = {}, {}

local function pending_get(key)
  local n = pend[key]
  if n == nil then
    local raw = redis.call('HGET', K.pending, key)
    n = 0
    pend_old[key] = 0
    if raw then
      local parsed = parse_count(raw)
      if parsed then
        n = parsed
        pend_old[key] = parsed
      else
        note('pending count ' .. show(raw) .. ' of a name is not a count: counted as 0 and rewritten')
        pend_old[key] = -1  -- rewritten by flush whatever the new value
      end
    end
    pend[key] = n
  end
  return n
end

-- Never below 0: a drop below it means the stored count was lost or wrong.
local function pending_add(key, delta)
  if key ~= '' then
    pend[key] = math.max(pending_get(key) + delta, 0)
  end
end

-- The done set: one HASH bucket per first BUCKET_BYTES bytes of a digest (key
-- `<prefix>:{NAME}:d:<those bytes>`), field = the rest of the digest, value ''.
-- K.dcount counts the names. The caller passes each bucket key a call needs once,
-- after the fixed keys; they are looked up by the bytes after `:d:`.
local BUCKET_BYTES = 2
local buckets = nil

local function done_bucket(digest)
  if not buckets then
    buckets = {}
    local skip = #K.dcount - #'dcount' + #'d:'  -- the bucket prefix is the counter's, 'd:' for 'dcount'
    for i = FIXED_KEYS + 1, #KEYS do
      buckets[string.sub(KEYS[i], skip + 1)] = KEYS[i]
    end
  end
  local key = buckets[string.sub(digest, 1, BUCKET_BYTES)]
  if not key then
    error('achihuo: the done-set bucket of a name is not in KEYS')
  end
  return key, string.sub(digest, BUCKET_BYTES + 1)
end

-- A bucket field's value: '' = done for ever, decimal digits = done until that second
-- (server clock; a ttl's end is rounded up to the next second, never down).
-- done_now/done_old hold, per digest, what is stored: false (nothing), '' or the second.
local done_now, done_old = {}, {}

local checked = {}

local clock = nil

-- The server time in ms, read once per script.
local function clock_ms()
  if not clock then
    clock = now_ms()
  end
  return clock
end

local function done_value(digest)
  local v = done_now[digest]
  if v == nil then
    local key, field = done_bucket(digest)
    if not checked[key] then  -- a bucket of another type holds no readable name: dropped
      checked[key] = true
      local t = redis.call('TYPE', key)['ok']
      if t ~= 'none' and t ~= 'hash' then
        note('done-set bucket ' .. key .. ' held a ' .. t .. ': dropped (the counter is recounted)')
        redis.call('DEL', key)
        redis.call('SET', K.dcount, 'unreadable')
      end
    end
    local raw = redis.call('HGET', key, field)
    local old = raw
    if not raw then
      v = false
    elseif raw == '' then
      v = ''
    else
      v = parse_count(raw)
      if not v then  -- kept as done for ever (losing nothing); a writing script stores it as such
        note('done-set entry ' .. show(raw) .. ' of a name is not a ttl: counted as done for ever')
        v = ''
      end
      if v == '' or raw ~= idstr(v) then
        old = raw
      else
        old = v
      end
    end
    done_now[digest] = v
    done_old[digest] = old
  end
  return v
end

-- Whether a digest is done now (stored, and its ttl has not ended).
local function done_has(digest)
  local v = done_value(digest)
  return v == '' or (v ~= false and v * 1000 > clock_ms())
end

-- Put digests in for ever (present) or out of the done set; returns how many changed
-- (were not done, or were done, before).
local function done_put(digests, present)
  local n = 0
  for _, digest in ipairs(digests) do
    if done_has(digest) ~= present then
      n = n + 1
    end
    done_now[digest] = present and '' or false
  end
  return n
end

-- Put digests in for a ttl each: a flat list digest, ttl ms, ...; returns how many were not done.
local function done_expire(items)
  local n = 0
  for i = 1, #items - 1, 2 do
    local digest, ttl = items[i], tonumber(items[i + 1])
    if ttl and ttl > 0 then
      if not done_has(digest) then
        n = n + 1
      end
      done_now[digest] = math.ceil((clock_ms() + ttl) / 1000)
    end
  end
  return n
end

-- -- tasks -----------------------------------------------------------------------------

-- Insert a list of tasks {payload, key digest or '', flags (1 unique + 2 head), delay ms}.
-- Unique tasks are skipped when their key is pending (or done, if check_done),
-- counting the tasks inserted before them; a copy of key `discount` counts as gone
-- already (a task whose ack comes in a later step). Returns how many were enqueued.
local function insert(tasks, check_done, discount)
  local n = 0
  local head = {}
  local now = nil
  for _, t in ipairs(tasks) do
    local payload, key, flags, delay = t[1], t[2], t[3], t[4]
    local blocked = false
    if key ~= '' and flags % 2 == 1 then
      local copies = pending_get(key)
      if key == discount then
        copies = copies - 1
      end
      blocked = copies > 0 or (check_done and done_has(key))
    end
    if not blocked then
      pending_add(key, 1)
      n = n + 1
      local id = next_id()
      W.tasks[#W.tasks + 1] = id
      W.tasks[#W.tasks + 1] = payload
      W.meta[#W.meta + 1] = id
      W.meta[#W.meta + 1] = pack_meta(0, 0, key)
      if delay > 0 then
        now = now or now_ms()
        W.zadd[#W.zadd + 1] = now + delay
        W.zadd[#W.zadd + 1] = zmember(id)
      elseif flags >= 2 then
        head[#head + 1] = id
      else
        W.tail[#W.tail + 1] = id
      end
    end
  end
  if #head > 0 then
    W.heads[#W.heads + 1] = head
  end
  W.wake = W.wake + n
  return n
end

-- Move a bad task entry (any stored id, valid or not) to the dead letters: its
-- payload when there is one within MAX_PAYLOAD, its key and failures when its meta
-- is readable (the key's pending count then drops), and the reason.
local quarantined = {}

local function quarantine(raw, reason)
  if quarantined[raw] then
    return
  end
  quarantined[raw] = true
  local payload = ''
  local size = redis.call('HSTRLEN', K.tasks, raw)
  if size > MAX_PAYLOAD then
    reason = reason .. '; its payload of ' .. size .. ' bytes was dropped'
  else
    payload = redis.call('HGET', K.tasks, raw) or ''
  end
  local _, failures, key = parse_meta(redis.call('HGET', K.meta, raw))
  if key then
    pending_add(key, -1)
  end
  W.del[#W.del + 1] = raw
  local id = 0
  if valid_id(raw) then
    id = tonumber(raw)
  end
  W.dead[#W.dead + 1] = cmsgpack.pack({id, failures or 0, key or '', 'achihuo: quarantined: ' .. reason, payload})
  note('task ' .. show(raw) .. ': ' .. reason .. ': moved to the dead letters')
end

-- Ids of the tasks `worker` holds a lease on (any order). A lease entry whose id is
-- not an id is quarantined.
local function worker_lease_ids(worker)
  local ids = {}
  local leased = redis.call('HGETALL', K.leased)
  for i = 1, #leased, 2 do
    local _, holder = parse_token(leased[i + 1])
    if holder == worker then
      if valid_id(leased[i]) then
        ids[#ids + 1] = leased[i]
      else
        quarantine(leased[i], 'lease entry is not a task id')
      end
    end
  end
  return ids
end

-- Give up leases (by id, any order): the tasks go back to the head in id order.
local function release_ids(ids)
  table.sort(ids, function(a, b) return tonumber(a) < tonumber(b) end)
  for _, id in ipairs(ids) do
    W.del_leased[#W.del_leased + 1] = id
  end
  W.heads[#W.heads + 1] = ids
  W.wake = W.wake + #ids
  return #ids
end

-- -- workers ---------------------------------------------------------------------------

-- Remove a worker record, its info, its mailbox and its alias (if still its own; an
-- unreadable record (nil) gives no alias: every alias naming the worker goes).
local function forget_worker(worker, record)
  redis.call('HDEL', K.workers, worker)
  redis.call('HDEL', K.winfo, worker)
  redis.call('HDEL', K.mailbox, worker)
  if record then
    if redis.call('HGET', K.aliases, record[1]) == worker then
      redis.call('HDEL', K.aliases, record[1])
    end
  else
    local aliases = redis.call('HGETALL', K.aliases)
    for i = 1, #aliases, 2 do
      if aliases[i + 1] == worker then
        redis.call('HDEL', K.aliases, aliases[i])
      end
    end
  end
end

-- -- phase 2 ---------------------------------------------------------------------------

local function to_head(ids)
  local reversed = {}
  for i = #ids, 1, -1 do
    reversed[#reversed + 1] = ids[i]
  end
  call_chunked('LPUSH', K.ready, reversed)
end

local function flush()
  if W.trim_ready > 0 then
    redis.call('LTRIM', K.ready, W.trim_ready, -1)
  end
  if W.trim_dead > 0 then
    redis.call('LTRIM', K.dead, W.trim_dead, -1)
  end
  call_chunked('HDEL', K.leased, W.del_leased)
  call_chunked('HDEL', K.leased, W.del)
  call_chunked('HDEL', K.tasks, W.del)
  call_chunked('HDEL', K.meta, W.del)
  if W.seq then
    redis.call('SET', K.seq, idstr(W.seq))
  end
  call_chunked('HSET', K.tasks, W.tasks)
  call_chunked('HSET', K.meta, W.meta)
  call_chunked('HSET', K.leased, W.leased)
  call_chunked('ZREM', K.delayed, W.zrem)
  call_chunked('ZADD', K.delayed, W.zadd)
  call_chunked('RPUSH', K.ready, W.tail)
  for _, ids in ipairs(W.heads) do
    to_head(ids)
  end
  -- pending counts that changed (or were unreadable)
  local set, del = {}, {}
  for key, n in pairs(pend) do
    if n ~= pend_old[key] then
      if n > 0 then
        set[#set + 1] = key
        set[#set + 1] = idstr(n)
      else
        del[#del + 1] = key
      end
    end
  end
  call_chunked('HSET', K.pending, set)
  call_chunked('HDEL', K.pending, del)
  -- done-set changes; the counter follows (an unreadable one is left for count() to repair)
  local delta = 0
  for digest, v in pairs(done_now) do
    local old = done_old[digest]
    if v ~= old then
      local key, field = done_bucket(digest)
      if v == false then
        redis.call('HDEL', key, field)
        delta = delta - 1
      else
        redis.call('HSET', key, field, v == '' and '' or idstr(v))
        if old == false then
          delta = delta + 1
        end
      end
    end
  end
  if delta ~= 0 then
    local raw = redis.call('GET', K.dcount)
    local count = 0
    if raw then
      count = parse_count(raw)
    end
    if count then
      if count + delta > 0 then
        redis.call('SET', K.dcount, idstr(count + delta))
      else
        redis.call('DEL', K.dcount)
      end
    else
      note('done-set counter ' .. show(raw) .. ' is unreadable: left for the next count() to recount')
    end
  end
  call_chunked('RPUSH', K.dead, W.dead)
  if W.wake > 0 then
    local tokens = {}
    for i = 1, math.min(W.wake, WAKE_TOKENS) do tokens[i] = '1' end
    redis.call('RPUSH', K.wake, unpack(tokens))
    redis.call('LTRIM', K.wake, -WAKE_TOKENS, -1)
    redis.call('EXPIRE', K.wake, WAKE_TTL)
  end
end
