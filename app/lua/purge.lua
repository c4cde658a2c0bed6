-- Delete finished enrollments of one campaign, state and shard that finished at or before
-- a cutoff: the record, its history and its index entry, each checked here (a replay or a
-- re-entry may have moved it on since it was listed).
--
-- KEYS[1] the index set of the state  KEYS[2..] record and history key of each enrollment
-- ARGV[1] the state  ARGV[2] cutoff (ms)  ARGV[3] '1': count only  ARGV[4..] the ids
-- Returns how many were (or, counting only, would be) deleted.
local index, state, cutoff, dry = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1'
local n = 0
for i = 4, #ARGV do
  local id = ARGV[i]
  local rec, hist = KEYS[2 * (i - 3)], KEYS[2 * (i - 3) + 1]
  local fields = redis.call('HMGET', rec, 'state', 'updated_at')
  if not fields[1] then
    if not dry then redis.call('SREM', index, id) end  -- an index entry with no record
  elseif fields[1] == state and (tonumber(fields[2]) or 0) <= cutoff then
    n = n + 1
    if not dry then
      redis.call('DEL', rec, hist)
      redis.call('SREM', index, id)
    end
  end
end
return n
