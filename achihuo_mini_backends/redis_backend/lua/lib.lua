-- Shared helpers of the achihuo_mini Redis backend.
--
-- The module prepends generated lines `local K = {seq = KEYS[1], ...}` and
-- `local FIXED_KEYS = <#K>` and this file to every script, so every key a script
-- touches comes from KEYS (all keys of one loop share the `{NAME}` hash tag: one
-- Cluster slot). KEYS after the fixed ones are done-set buckets (see done_bucket).
--
-- Task batches arrive as one msgpack ARGV (Redis's cmsgpack reads msgpack raw
-- strings, not the bin type), so a batch is never limited by Lua's unpack;
-- multi-argument commands are issued in chunks of CHUNK.
--
-- Layout (see the module docstring):
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
--   winfo    HASH    worker -> info (JSON text, opaque here)
--   aliases  HASH    alias -> worker
--   mailbox  HASH    worker -> cmsgpack list of commands

local WAKE_TOKENS = 16   -- at most this many idle workers are woken by one write
local WAKE_TTL = 60      -- seconds a wake-up token lives without a waiter
local CHUNK = 512        -- arguments per multi-argument call: far below Lua's unpack limit; even

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

local function idstr(n)
  return string.format('%d', n)
end

-- Delayed members are fixed width so that equal due times keep id order.
local function zmember(id)
  return string.format('%016d', tonumber(id))
end

local function pack_meta(attempt, failures, key)
  return struct.pack('>I4I4', attempt, failures) .. key
end

local function unpack_meta(s)
  local attempt, failures = struct.unpack('>I4I4', s)
  return attempt, failures, string.sub(s, 9)
end

-- redis.call(cmd, key, items...) in chunks (items may be field/value or score/member
-- pairs: CHUNK is even). Returns the sum of the replies.
local function call_chunked(cmd, key, items)
  local total = 0
  for i = 1, #items, CHUNK do
    total = total + redis.call(cmd, key, unpack(items, i, math.min(i + CHUNK - 1, #items)))
  end
  return total
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

-- The done set: one HASH bucket per first BUCKET_BYTES bytes of a digest (key
-- `<prefix>:{NAME}:d:<those bytes>`), field = the rest of the digest, value ''.
-- K.dcount counts the names, kept exact from HSETNX/HDEL replies. The caller passes
-- each bucket key a call needs once, after the fixed keys; they are looked up by
-- the bytes after `:d:`.
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

local function done_has(digest)
  local key, field = done_bucket(digest)
  return redis.call('HEXISTS', key, field) == 1
end

-- Add digests to the done set; returns how many were new.
local function done_add(digests)
  local n = 0
  for _, digest in ipairs(digests) do
    local key, field = done_bucket(digest)
    n = n + redis.call('HSETNX', key, field, '')
  end
  if n > 0 then
    redis.call('INCRBY', K.dcount, n)
  end
  return n
end

-- Remove digests from the done set; returns how many were there. An emptied bucket
-- goes away by itself; an emptied set takes its counter along.
local function done_remove(digests)
  local n = 0
  for _, digest in ipairs(digests) do
    local key, field = done_bucket(digest)
    n = n + redis.call('HDEL', key, field)
  end
  if n > 0 and redis.call('DECRBY', K.dcount, n) <= 0 then
    redis.call('DEL', K.dcount)
  end
  return n
end

local function pending_drop(key)
  if key ~= '' and redis.call('HINCRBY', K.pending, key, -1) <= 0 then
    redis.call('HDEL', K.pending, key)
  end
end

local function wake(n)
  if n > 0 then
    local tokens = {}
    for i = 1, math.min(n, WAKE_TOKENS) do tokens[i] = '1' end
    redis.call('RPUSH', K.wake, unpack(tokens))
    redis.call('LTRIM', K.wake, -WAKE_TOKENS, -1)
    redis.call('EXPIRE', K.wake, WAKE_TTL)
  end
end

-- Push ids to the head so that they run in list order, before what is there.
local function to_head(ids)
  local reversed = {}
  for i = #ids, 1, -1 do
    reversed[#reversed + 1] = ids[i]
  end
  call_chunked('LPUSH', K.ready, reversed)
end

-- Insert a list of tasks {payload, key digest or '', flags (1 unique + 2 head), delay ms}.
-- Unique tasks are skipped when their key is pending (or done, if check_done),
-- counting the tasks inserted before them. Returns how many were enqueued.
local function insert(tasks, check_done)
  if #tasks == 0 then
    return 0
  end
  local base = tonumber(redis.call('GET', K.seq)) or first_id()
  local n = 0
  local payloads, metas, tail, head, delayed = {}, {}, {}, {}, {}
  local now = nil
  for _, t in ipairs(tasks) do
    local payload, key, flags, delay = t[1], t[2], t[3], t[4]
    local skip = false
    if key ~= '' then
      if flags % 2 == 1 and ((tonumber(redis.call('HGET', K.pending, key)) or 0) > 0
          or (check_done and done_has(key))) then
        skip = true
      else
        redis.call('HINCRBY', K.pending, key, 1)
      end
    end
    if not skip then
      n = n + 1
      local id = idstr(base + n)
      payloads[#payloads + 1] = id
      payloads[#payloads + 1] = payload
      metas[#metas + 1] = id
      metas[#metas + 1] = pack_meta(0, 0, key)
      if delay > 0 then
        now = now or now_ms()
        delayed[#delayed + 1] = now + delay
        delayed[#delayed + 1] = zmember(id)
      elseif flags >= 2 then
        head[#head + 1] = id
      else
        tail[#tail + 1] = id
      end
    end
  end
  if n > 0 then
    redis.call('SET', K.seq, idstr(base + n))
    call_chunked('HSET', K.tasks, payloads)
    call_chunked('HSET', K.meta, metas)
    call_chunked('RPUSH', K.ready, tail)
    call_chunked('ZADD', K.delayed, delayed)
    to_head(head)
  end
  return n
end

-- The lease token '<attempt>:<worker>' -> worker.
local function token_worker(token)
  return string.sub(token, string.find(token, ':', 1, true) + 1)
end

-- Ids of the tasks `worker` holds a lease on (any order).
local function worker_lease_ids(worker)
  local ids = {}
  local leased = redis.call('HGETALL', K.leased)
  for i = 1, #leased, 2 do
    if token_worker(leased[i + 1]) == worker then
      ids[#ids + 1] = leased[i]
    end
  end
  return ids
end

-- Give up leases (by id, any order) and put the tasks back at the head in id order.
local function release_ids(ids)
  table.sort(ids, function(a, b) return tonumber(a) < tonumber(b) end)
  call_chunked('HDEL', K.leased, ids)
  to_head(ids)
  wake(#ids)
  return #ids
end

-- Release every lease whose worker is not registered.
local function release_orphans()
  local registered = {}
  local ids = {}
  local leased = redis.call('HGETALL', K.leased)
  for i = 1, #leased, 2 do
    local worker = token_worker(leased[i + 1])
    local alive = registered[worker]
    if alive == nil then
      alive = redis.call('HEXISTS', K.workers, worker) == 1
      registered[worker] = alive
    end
    if not alive then
      ids[#ids + 1] = leased[i]
    end
  end
  return release_ids(ids)
end

-- Remove a worker record, its info, its mailbox and its alias (if still its own).
local function forget_worker(worker, record)
  redis.call('HDEL', K.workers, worker)
  redis.call('HDEL', K.winfo, worker)
  redis.call('HDEL', K.mailbox, worker)
  if record and redis.call('HGET', K.aliases, record[1]) == worker then
    redis.call('HDEL', K.aliases, record[1])
  end
end
