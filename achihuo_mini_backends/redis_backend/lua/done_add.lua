-- done_add: ARGV = digests; KEYS hold the bucket of each. Returns how many were new.
return done_add(ARGV)
