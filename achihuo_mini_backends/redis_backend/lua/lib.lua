-- Shared helpers of the achihuo_mini Redis backend.
--
-- The module prepends generated lines `local K = {seq = KEYS[1], ...}`,
-- `local FIXED_KEYS = <#K>` and the limits below (MAX_PAYLOAD, MAX_RECORD, MAX_INFO),
-- then this file (notes, validation, parsing) and lib_state.lua (what a script
-- reads and decides, and flush), to every script, so every key a script touches comes from KEYS
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
--   stats    HASH    counter name -> integer (the loop's statistics, summed over workers)
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
  aliases = 'hash', mailbox = 'hash', stats = 'hash',
}

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

-- Check the type of the keys a script will write (or read as a whole), before it
-- writes anything. A key holding another type is repaired when what it holds can be
-- rebuilt or given up safely (a warning says so), else the script fails before any
-- write:
--   seq, wake, winfo, mailbox: dropped (the id counter restarts from the clock,
--     wake-ups and info come again, a mailbox that cannot be read has no command);
--   pending: dropped: every count counts as 0 (as a bad count does: duplicates at
--     worst, never a loss); dcount: marked unreadable (count() recounts);
--   workers: dropped with the aliases (the workers register again, recover releases
--     their old leases); aliases: rebuilt from the worker records;
--   tasks, meta, ready, delayed, leased, dead: an error (dropping them loses tasks).
local REPAIRABLE = {seq = true, wake = true, winfo = true, mailbox = true, pending = true, dcount = true,
                    workers = true, aliases = true, stats = true}
local ORDER = {'seq', 'tasks', 'meta', 'ready', 'delayed', 'leased', 'pending', 'dcount', 'dead', 'wake',
               'workers', 'winfo', 'aliases', 'mailbox', 'stats'}

local function expect(...)
  local wanted = {}
  for _, part in ipairs({...}) do
    wanted[part] = true
  end
  for _, part in ipairs(ORDER) do  -- workers before aliases
    if wanted[part] then
      local t = redis.call('TYPE', K[part])['ok']
      if t ~= 'none' and t ~= TYPES[part] then
        if not REPAIRABLE[part] then
          error('achihuo: key ' .. K[part] .. ' holds a ' .. t .. ', not a ' .. TYPES[part] ..
                '; nothing was written (repair or clear that key)')
        end
        note('key ' .. K[part] .. ' held a ' .. t .. ', not a ' .. TYPES[part] .. ': repaired')
        redis.call('DEL', K[part])
        if part == 'dcount' then
          redis.call('SET', K.dcount, 'unreadable')
        elseif part == 'workers' then
          redis.call('DEL', K.aliases)
        elseif part == 'aliases' then
          local all = redis.call('HGETALL', K.workers)
          for i = 1, #all, 2 do
            local r = parse_worker(all[i + 1])
            if r then
              redis.call('HSET', K.aliases, r[1], all[i])
            end
          end
        end
      end
    end
  end
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
