-- done_expire: ARGV = digest, ttl in ms, digest, ttl in ms, ...; KEYS hold the bucket of each.
-- Each name is done until its ttl has passed (rounded up to the next second of the server
-- clock); the last pair of a digest wins. Returns how many were not done before.
expect('dcount')
local n = done_expire(ARGV)
flush()
return reply(n)
