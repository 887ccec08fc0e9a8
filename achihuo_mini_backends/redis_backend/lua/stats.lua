-- stats: one snapshot {ready, delayed, leased, dead}.
return reply({
  redis.call('LLEN', K.ready),
  redis.call('ZCARD', K.delayed),
  redis.call('HLEN', K.leased),
  redis.call('LLEN', K.dead),
})
