-- done_remove: ARGV = digests; KEYS hold the bucket of each. Returns how many were there.
return done_remove(ARGV)
