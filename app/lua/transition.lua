-- Atomically move one enrollment from an expected (state, step[, attempt]) to a new state,
-- append history, keep the state indexes, and add/remove the arq jobs that go with it.
--
-- KEYS[1] enrollment hash   KEYS[2] history list   KEYS[3] arq queue (sorted set)
-- ARGV[1] JSON operation:
--   expect      {states = {...}, step = n|nil, attempt = n|nil, job = id|nil}
--               (nil: any; job: the record's current job must be this one)
--   create      true to create the record (KEYS[1] must not exist unless reentry allows)
--   reentry     with create: a terminal record may be replaced (its step must equal expect.step)
--   set         {field = "value", ...}       unset {field, ...}
--   history     {json-string, ...}           history_limit n
--   add_job     {id=, payload=, score=ms, ttl=ms} or nil
--   remove_jobs {id, ...}
--   idx_prefix  prefix of the state index sets ("<prefix>:idx:")
-- Returns {1, new_state} | {0, current_state, current_step} (precondition failed)
--       | {-1} (no such enrollment) | {-2, job_id} (job id taken: nothing written)
local op = cjson.decode(ARGV[1])
local enr, hist, queue = KEYS[1], KEYS[2], KEYS[3]
local id = string.sub(enr, string.len(op.enr_prefix) + 1)

local current = redis.call('HMGET', enr, 'state', 'step', 'attempt', 'campaign')
local state, step, attempt, campaign = current[1], current[2], current[3], current[4]

if op.create then
  if state then
    local terminal = state == 'completed' or state == 'failed' or state == 'cancelled'
    if not (op.reentry and terminal and tonumber(step) == op.expect.step) then
      return {0, state, tonumber(step)}
    end
  elseif op.expect.step ~= 0 then
    return {0, '', 0}
  end
else
  if not state then return {-1} end
  local ok = false
  for _, s in ipairs(op.expect.states) do
    if s == state then ok = true end
  end
  if op.expect.step ~= nil and op.expect.step ~= cjson.null and tonumber(step) ~= op.expect.step then ok = false end
  if op.expect.attempt ~= nil and op.expect.attempt ~= cjson.null and tonumber(attempt) ~= op.expect.attempt then ok = false end
  if op.expect.job ~= nil and op.expect.job ~= cjson.null and redis.call('HGET', enr, 'job') ~= op.expect.job then ok = false end
  if not ok then return {0, state, tonumber(step)} end
end

local job = op.add_job
if job ~= nil and job ~= cjson.null then
  if redis.call('EXISTS', 'arq:job:' .. job.id, 'arq:result:' .. job.id) > 0 then
    return {-2, job.id}
  end
end

-- All checks passed: write.
if op.remove_jobs then
  for _, jid in ipairs(op.remove_jobs) do
    redis.call('ZREM', queue, jid)
    redis.call('DEL', 'arq:job:' .. jid, 'arq:retry:' .. jid)
  end
end
if job ~= nil and job ~= cjson.null then
  redis.call('SET', 'arq:job:' .. job.id, job.payload, 'PX', job.ttl)
  redis.call('ZADD', queue, job.score, job.id)
end

local new_state = op.set.state or state
local new_campaign = op.set.campaign or campaign
if op.unset and #op.unset > 0 then
  redis.call('HDEL', enr, unpack(op.unset))
end
local flat = {}
for k, v in pairs(op.set) do
  flat[#flat + 1] = k
  flat[#flat + 1] = v
end
if #flat > 0 then redis.call('HSET', enr, unpack(flat)) end

if state ~= new_state or campaign ~= new_campaign then
  if state then redis.call('SREM', op.idx_prefix .. campaign .. ':' .. state, id) end
  redis.call('SADD', op.idx_prefix .. new_campaign .. ':' .. new_state, id)
end

if op.history and #op.history > 0 then
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
