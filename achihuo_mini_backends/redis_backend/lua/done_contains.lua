-- done_contains: ARGV = digests; KEYS hold the bucket of each. Returns 1 or 0 per digest, in order.
expect('dcount')
local out = {}
for i, digest in ipairs(ARGV) do
  out[i] = done_has(digest) and 1 or 0
end
return reply(out)
