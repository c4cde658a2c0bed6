-- Enroll a batch of contacts of one campaign version in one call: for each, create its
-- record, index it and queue its first job, unless it already has a record (skipped) or
-- the job id is taken by a leftover job (a conflict), or a purged enrollment with its id
-- left a tombstone (its steps must go on from the last one: lua/transition.lua creates
-- those). Planning happened in Python; this only writes. No history list is written: the
-- record says how it started.
--
-- KEYS[1] queue  KEYS[2] jobs  KEYS[3] index set of the state the contacts start in
-- KEYS[4] the shard's tombstones  KEYS[5..] the record of each contact, in order
-- ARGV[1] JSON of the fields every record gets (state, node, step, attempt, version, ...)
-- ARGV[2] the name of the time field each contact's due time goes in ('run_at', 'deadline'
--         or '' for none)
-- ARGV[3] JSON array, per contact: [enrollment id, job id ('' for none), job payload, due
--         time (ms), attributes JSON, time zone ('' for none)] (one string: packing
--         thousands of separate arguments costs the client more than the whole script)
-- Returns one value per contact: 1 enrolled, -2 job id taken, -3 it has a tombstone (not
-- created), else the state it is in.
local common = cjson.decode(ARGV[1])
local time_field = ARGV[2]
local queue, jobs, index, tombstones = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local flat = {}
for k, v in pairs(common) do
  flat[#flat + 1] = k
  flat[#flat + 1] = v
end
local rows = cjson.decode(ARGV[3])
local out, members, payloads, scores = {}, {}, {}, {}
for i = 5, #KEYS do
  local row = rows[i - 4]
  local eid, job, payload, due, attributes, tz = row[1], row[2], row[3], row[4], row[5], row[6]
  local enr = KEYS[i]
  local exists = redis.call('EXISTS', enr) == 1
  local state = exists and redis.call('HGET', enr, 'state')
  if state then
    out[#out + 1] = state
  elseif redis.call('HEXISTS', tombstones, eid) == 1 then
    out[#out + 1] = -3
  elseif job ~= '' and redis.call('HEXISTS', jobs, job) == 1 then
    out[#out + 1] = -2
  else
    if exists then redis.call('DEL', enr) end  -- a hash without a state is debris
    local fields = {unpack(flat)}
    fields[#fields + 1] = 'attributes'
    fields[#fields + 1] = attributes
    if job ~= '' then
      fields[#fields + 1] = 'job'
      fields[#fields + 1] = job
    end
    if time_field ~= '' then
      fields[#fields + 1] = time_field
      fields[#fields + 1] = string.format('%d', due)
    end
    if tz ~= '' then
      fields[#fields + 1] = 'timezone'
      fields[#fields + 1] = tz
    end
    redis.call('HSET', enr, unpack(fields))
    members[#members + 1] = eid
    if job ~= '' then
      payloads[#payloads + 1] = job
      payloads[#payloads + 1] = payload
      scores[#scores + 1] = due
      scores[#scores + 1] = job
    end
    out[#out + 1] = 1
  end
end
-- The index, payloads and queue entries of the whole batch in one command each (a record
-- is written at once, so a contact twice in one batch is seen as already enrolled).
if #members > 0 then redis.call('SADD', index, unpack(members)) end
if #payloads > 0 then
  redis.call('HSET', jobs, unpack(payloads))
  redis.call('ZADD', queue, unpack(scores))
end
return out
