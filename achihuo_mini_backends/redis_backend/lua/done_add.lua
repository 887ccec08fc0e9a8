-- done_add: ARGV = digests; KEYS hold the bucket of each. Returns how many were new.
expect('dcount')
local n = done_put(ARGV, true)
flush()
return reply(n)
