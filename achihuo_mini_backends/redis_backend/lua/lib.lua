-- Shared helpers of the achihuo_mini Redis backend.
--
-- The module prepends generated lines `local K = {seq = KEYS[1], ...}`,
-- `local FIXED_KEYS = <#K>` and the limits below (MAX_PAYLOAD, MAX_RECORD, MAX_INFO),
-- then this file, to every script, so every key a script touches comes from KEYS
-- (all keys of one loop share the `{NAME}` hash tag: one Cluster slot). KEYS after
-- the fixed ones are done-set buckets (see done_bucket).
--
-- Layout (see the package docstring):
--   seq      STRING  last task id (first one from TIME in microseconds)
--   tasks    HASH    id -> payload
--   meta     HASH    id -> struct '>I4I4' (attempt, failures) .. key digest ('' = unnamed)
--   ready    LIST    ids, head first
--   delayed  ZSET    zero-padded id, score = due time in ms (Redis TIME)
--   leased   HASH    id -> '<attempt>:<worker>' (the fencing token)
--   pending  HASH    key digest -> copies ready, delayed or leased
--   dcount   STRING  number of names in the done set
--   d:<b0b1> HASH    done-set bucket: digest bytes 3..16 -> '' (b0 b1: its first 2 bytes)
--   dead     LIST    cmsgpack {id, failures, key, error, payload}, oldest first
--   wake     LIST    wake-up tokens for idle workers (short, expiring)
--   workers  HASH    worker -> cmsgpack {alias, role, ttl_ms, last_seen_ms}
--   winfo    HASH    worker -> info (JSON text, read by the Python side)
--   aliases  HASH    alias -> worker
--   mailbox  HASH    worker -> cmsgpack list of commands
--
-- Redis does not roll back a script that fails half-way, and anything stored may
-- have been written by someone else. So a script that writes works in two phases:
--   1. read and validate: `expect` checks the type of every key it will write, the
--      other helpers read through caches and validate each entry; a bad entry is
--      quarantined (a task to the dead letters, see `quarantine`) or repaired (a
--      count), and a `note` says so;
--   2. `flush` writes what phase 1 decided, with commands that cannot fail on the
--      keys checked in phase 1.
-- Registry scripts write a few hash fields directly, after validating what they read.
-- Every script returns `reply(result)`: {result, notes}; the Python side logs the notes.

local WAKE_TOKENS = 16   -- at most this many idle workers are woken by one write
local WAKE_TTL = 60      -- seconds a wake-up token lives without a waiter
local CHUNK = 512        -- arguments per multi-argument call: far below Lua's unpack limit; even
local MAX_ID = 9007199254740991  -- 2^53 - 1: ids stay exact in Lua's doubles
local MAX_U32 = 4294967295
local MAX_NOTES = 20

-- -- notes and replies ------------------------------------------------------------

local notes = {}
local dropped_notes = 0

-- A short printable form of stored bytes, for notes (never the whole value).
local function show(s)
  if type(s) ~= 'string' then
    return '<' .. type(s) .. '>'
  end
  local cut = string.sub(s, 1, 32)
  cut = string.gsub(cut, '[^%w%-%._:]', function(c) return string.format('\\x%02x', string.byte(c)) end)
  if #s > 32 then
    cut = cut .. '...(' .. #s .. ' bytes)'
  end
  return "'" .. cut .. "'"
end

local function note(text)
  if #notes < MAX_NOTES then
    notes[#notes + 1] = text
  else
    dropped_notes = dropped_notes + 1
  end
end

local function reply(result)
  if dropped_notes > 0 then
    notes[#notes + 1] = dropped_notes .. ' more repairs of the same kind'
  end
  return {result, notes}
end

-- -- validation --------------------------------------------------------------------

local TYPES = {
  seq = 'string', tasks = 'hash', meta = 'hash', ready = 'list', delayed = 'zset', leased = 'hash',
  pending = 'hash', dcount = 'string', dead = 'list', wake = 'list', workers = 'hash', winfo = 'hash',
  aliases = 'hash', mailbox = 'hash',
}

-- Fail (before any write) when a key the script writes holds another type.
local function expect(...)
  for _, part in ipairs({...}) do
    local t = redis.call('TYPE', K[part])['ok']
    if t ~= 'none' and t ~= TYPES[part] then
      error('achihuo: key ' .. K[part] .. ' holds a ' .. t .. ', not a ' .. TYPES[part] ..
            '; nothing was written (repair or clear that key)')
    end
  end
end

local function idstr(n)
  return string.format('%d', n)
end

-- A task id as stored: decimal digits, no leading zero, below 2^53.
local function valid_id(s)
  return type(s) == 'string' and #s <= 16 and string.find(s, '^[1-9]%d*$') ~= nil and tonumber(s) <= MAX_ID
end

-- Delayed members are fixed width so that equal due times keep id order.
local function zmember(id)
  return string.format('%016d', tonumber(id))
end

-- The id of a delayed member, or nil when it is not one.
local function member_id(m)
  if type(m) == 'string' and #m <= 16 and string.find(m, '^%d+$') then
    local n = tonumber(m)
    if n >= 1 and n <= MAX_ID then
      return idstr(n)
    end
  end
  return nil
end

-- A count as stored (pending, dcount): decimal digits below 2^53; nil otherwise.
local function parse_count(s)
  if type(s) == 'string' and #s <= 15 and string.find(s, '^%d+$') then
    return tonumber(s)
  end
  return nil
end

local function pack_meta(attempt, failures, key)
  return struct.pack('>I4I4', attempt, failures) .. key
end

-- attempt, failures, key of a meta entry; nil when it is not one (wrong length,
-- counters that cannot grow, a key that is not a 16-byte digest).
local function parse_meta(s)
  if type(s) ~= 'string' or (#s ~= 8 and #s ~= 24) then
    return nil
  end
  local attempt, failures = struct.unpack('>I4I4', s)
  if attempt >= MAX_U32 or failures >= MAX_U32 then
    return nil
  end
  return attempt, failures, string.sub(s, 9)
end

-- The lease token '<attempt>:<worker>' -> attempt, worker; nil when it is not one.
local function parse_token(token)
  if type(token) ~= 'string' then
    return nil
  end
  local attempt, worker = string.match(token, '^([1-9]%d?%d?%d?%d?%d?%d?%d?%d?%d?):(.*)$')
  if not attempt then
    return nil
  end
  return tonumber(attempt), worker
end

-- A stored msgpack value, or nil when it is too long or not msgpack.
local function unpack_record(s, max)
  if type(s) ~= 'string' or #s > max then
    return nil
  end
  local ok, value = pcall(cmsgpack.unpack, s)
  if ok then
    return value
  end
  return nil
end

local function is_int(n, low)
  return type(n) == 'number' and n == math.floor(n) and n >= low and n <= MAX_ID
end

-- A worker record {alias, role, ttl_ms, last_seen_ms}, or nil.
local function parse_worker(s)
  local r = unpack_record(s, 1024)
  if type(r) == 'table' and type(r[1]) == 'string' and type(r[2]) == 'string' and is_int(r[3], 0)
      and is_int(r[4], 0) then
    return r
  end
  return nil
end

-- A dead letter {id, failures, key, error, payload}, or nil.
local function parse_dead(s)
  local r = unpack_record(s, MAX_RECORD)
  if type(r) == 'table' and is_int(r[1], 0) and is_int(r[2], 0) and type(r[3]) == 'string'
      and (#r[3] == 0 or #r[3] == 16) and type(r[4]) == 'string' and type(r[5]) == 'string' then
    return r
  end
  return nil
end

-- The commands of a mailbox (its strings; anything else in it is dropped with a note).
local function parse_mailbox(worker, s)
  local box = unpack_record(s, MAX_RECORD)
  local commands = {}
  if type(box) ~= 'table' then
    note('mailbox of worker ' .. show(worker) .. ' is unreadable: emptied')
    return commands
  end
  for _, c in ipairs(box) do
    if type(c) == 'string' and #c <= 1024 then
      commands[#commands + 1] = c
    else
      note('a command in the mailbox of worker ' .. show(worker) .. ' is unreadable: dropped')
    end
  end
  return commands
end

-- -- clock and ids -------------------------------------------------------------------

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Task ids count up from the server's clock in microseconds when the namespace
-- starts (or restarts after a clear), so an id is not handed out again after a
-- clear and a stale lease stays fenced.
local function first_id()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

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

local done_now, done_old = {}, {}

local function done_has(digest)
  local v = done_now[digest]
  if v == nil then
    local key, field = done_bucket(digest)
    v = redis.call('HEXISTS', key, field) == 1
    done_now[digest] = v
    done_old[digest] = v
  end
  return v
end

-- Put digests in (present) or out of the done set; returns how many changed.
local function done_put(digests, present)
  local n = 0
  for _, digest in ipairs(digests) do
    if done_has(digest) ~= present then
      done_now[digest] = present
      n = n + 1
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
  for digest, present in pairs(done_now) do
    if present ~= done_old[digest] then
      local key, field = done_bucket(digest)
      if present then
        redis.call('HSET', key, field, '')
        delta = delta + 1
      else
        redis.call('HDEL', key, field)
        delta = delta - 1
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
