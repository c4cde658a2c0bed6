-- Delete finished enrollments of one campaign, state and shard that finished at or before
-- a cutoff: the record, its history and its index entry, each checked here (a replay or a
-- re-entry may have moved it on since it was listed). Each deleted enrollment leaves a
-- tombstone, its id -> the last step it reached, so that a contact enrolled again with the
-- same id goes on from there and never reuses an idempotency key ({enrollment_id}:{step}).
--
-- KEYS[1] the index set of the state  KEYS[2] the shard's tombstones
-- KEYS[3..] record and history key of each enrollment
-- ARGV[1] the state  ARGV[2] cutoff (ms)  ARGV[3] '1': count only  ARGV[4..] the ids
-- Returns how many were (or, counting only, would be) deleted.
local index, tombstones = KEYS[1], KEYS[2]
local state, cutoff, dry = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1'
local n = 0
for i = 4, #ARGV do
  local id = ARGV[i]
  local rec, hist = KEYS[2 * (i - 3) + 1], KEYS[2 * (i - 3) + 2]
  local fields = redis.call('HMGET', rec, 'state', 'updated_at', 'step')
  if not fields[1] then
    if not dry then redis.call('SREM', index, id) end  -- an index entry with no record
  elseif fields[1] == state and (tonumber(fields[2]) or 0) <= cutoff then
    n = n + 1
    if not dry then
      local step = tonumber(fields[3]) or 0
      local kept = tonumber(redis.call('HGET', tombstones, id)) or 0
      if step > kept then redis.call('HSET', tombstones, id, step) end
      redis.call('DEL', rec, hist)
      redis.call('SREM', index, id)
    end
  end
end
return n
