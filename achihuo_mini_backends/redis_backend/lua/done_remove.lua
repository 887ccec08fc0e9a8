-- done_remove: ARGV = digests; KEYS hold the bucket of each. Returns how many were there.
expect('dcount')
local n = done_put(ARGV, false)
flush()
return reply(n)
