-- Atomically move one enrollment from an expected (state, step[, attempt, job]) to a new
-- state: write the record, append history, keep the state index sets, and swap its job.
--
-- An active enrollment has exactly one current job (the record's `job` field). When a
-- transition gives it a new job, or a state without one, the current job is retired here:
-- taken off the queue, its lease and payload dropped. So finishing a step, retrying it and
-- queueing the next node's job are one call.
--
-- KEYS[1] enrollment hash  KEYS[2] history list  KEYS[3] queue  KEYS[4] leases  KEYS[5] jobs
-- KEYS[6] the shard's tombstones (enrollment id -> last step of a purged enrollment)
-- KEYS[7..] the campaign's index sets of the states in `idx` (every state the record may be
--           in or move to), in that order
-- ARGV[1] JSON operation:
--   id          enrollment id (index set member)     campaign  its campaign id
--   idx         the states whose index set keys follow KEYS[5]
--   expect      {states = {...}, step = n|nil, attempt = n|nil, job = id|nil}
--   create      create the record (it must not exist, unless `reentry` and it is terminal
--               with step == expect.step). With no record, expect.step must be the step
--               its tombstone keeps (0 without one): a purged enrollment's steps go on,
--               so its idempotency keys never repeat; creating it deletes the tombstone.
--   set, unset  fields to write / delete          history {json, ...}  history_limit n
--   add_job     {id, payload, score}: becomes the current job
--   requeue     ms: hand the current job back (lease dropped, queued at ms), keep it current
--   orphan      true: only if the current job is neither queued nor leased (reconciler)
--   unleased    true: only if the current job is not leased (a worker may be running it
--               with its payload: migrate must not swap that payload under it)
-- Returns {1, new_state} | {0, state, step} precondition failed ({0, '', step}: no record,
--         and the step its tombstone keeps) | {-1} no such enrollment
--       | {-2, job_id} job id taken by another enrollment | {-3} current job is not orphaned
--       | {-4, job_id} current job is leased (running now) and `unleased` was asked
-- A new enrollment's record says how it started (created_at, its first state and node),
-- so its history list is only made at its first move, starting with that entry. (The same
-- function is in worker/lua/claim.lua: scripts cannot share code.)
local function start_history(hist, enr)
  if redis.call('EXISTS', hist) == 1 then return end
  local r = redis.call('HMGET', enr, 'created_at', 'state', 'node', 'step', 'attempt')
  if not r[1] then return end
  redis.call('RPUSH', hist, cjson.encode({at = tonumber(r[1]), from = cjson.null, to = r[2],
    node = (r[3] and r[3] ~= '') and r[3] or cjson.null, step = tonumber(r[4]) or 0,
    attempt = tonumber(r[5]) or 1, reason = 'enrolled'}))
end

local op = cjson.decode(ARGV[1])
local enr, hist, queue, leases, jobs = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local tombstones = KEYS[6]
local index = {}
for i, s in ipairs(op.idx) do index[s] = KEYS[6 + i] end
local function given(v) return v ~= nil and v ~= cjson.null end

local cur = redis.call('HMGET', enr, 'state', 'step', 'attempt', 'campaign', 'job')
local state, step, attempt, campaign, current_job = cur[1], cur[2], cur[3], cur[4], cur[5]

if op.create then
  if state then
    local terminal = state == 'completed' or state == 'failed' or state == 'cancelled'
    if not (op.reentry and terminal and tonumber(step) == op.expect.step) then
      return {0, state, tonumber(step)}
    end
  else
    local base = tonumber(redis.call('HGET', tombstones, op.id)) or 0
    if op.expect.step ~= base then return {0, '', base} end
  end
else
  if not state then return {-1} end
  -- (records keep no campaign field: the enrollment id says it)
  if (campaign or string.match(op.id, '^([^:]+):')) ~= op.campaign then
    return {0, state, tonumber(step)}
  end
  local ok = false
  for _, s in ipairs(op.expect.states) do
    if s == state then ok = true end
  end
  if given(op.expect.step) and tonumber(step) ~= op.expect.step then ok = false end
  if given(op.expect.attempt) and tonumber(attempt) ~= op.expect.attempt then ok = false end
  if given(op.expect.job) and current_job ~= op.expect.job then ok = false end
  if not ok then return {0, state, tonumber(step)} end
end

if op.unleased and current_job and redis.call('ZSCORE', leases, current_job) then
  return {-4, current_job}
end

if op.orphan and current_job then
  if redis.call('ZSCORE', queue, current_job) or redis.call('ZSCORE', leases, current_job) then
    return {-3}
  end
end

local job = op.add_job
if given(job) and job.id ~= current_job and redis.call('HEXISTS', jobs, job.id) == 1 then
  return {-2, job.id}
end

local new_state = op.set.state or state
if state ~= new_state and ((state and not index[state]) or not index[new_state]) then
  return redis.error_reply('transition: no index key passed for state ' .. (state or '') .. '/' .. tostring(new_state))
end

-- All checks passed: write. (The history list is started from the record as it was.)
local write_history = op.history and #op.history > 0 and not (op.create and not state)
if write_history then start_history(hist, enr) end
if op.create then redis.call('HDEL', tombstones, op.id) end
if given(op.requeue) then
  if current_job and redis.call('HEXISTS', jobs, current_job) == 1 then
    redis.call('ZREM', leases, current_job)
    redis.call('ZADD', queue, op.requeue, current_job)
  end
elseif current_job and (given(job) or op.set.state) then
  redis.call('ZREM', queue, current_job)
  redis.call('ZREM', leases, current_job)
  redis.call('HDEL', jobs, current_job)
end
if given(job) then
  redis.call('HSET', jobs, job.id, job.payload)
  redis.call('ZADD', queue, job.score, job.id)
end

if op.unset and #op.unset > 0 then
  redis.call('HDEL', enr, unpack(op.unset))
end
local flat = {}
for k, v in pairs(op.set) do
  flat[#flat + 1] = k
  flat[#flat + 1] = v
end
if #flat > 0 then redis.call('HSET', enr, unpack(flat)) end

if state ~= new_state then
  if state then redis.call('SREM', index[state], op.id) end
  redis.call('SADD', index[new_state], op.id)
end

if write_history then
  -- The previous state is what was in Redis, whatever the caller assumed.
  for i, raw in ipairs(op.history) do
    local entry = cjson.decode(raw)
    entry['from'] = state or cjson.null
    op.history[i] = cjson.encode(entry)
  end
  redis.call('RPUSH', hist, unpack(op.history))
  redis.call('LTRIM', hist, -op.history_limit, -1)
end
return {1, new_state}
