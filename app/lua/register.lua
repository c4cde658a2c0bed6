-- Register a new version of a campaign: bump its version counter, store the definition.
-- KEYS[1] campaign hash   KEYS[2] set of campaign ids
-- ARGV[1] campaign id   ARGV[2] definition JSON (without a version: the field name has it)
-- Returns the new version number.
local version = redis.call('HINCRBY', KEYS[1], 'latest', 1)
redis.call('HSET', KEYS[1], 'v:' .. version, ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
return version
