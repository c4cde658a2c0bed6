-- Claim a step job for execution: scheduled -> running at the expected (step, attempt).
-- Only the record's current job may claim it (its id is in the record's `job` field): a
-- duplicate or superseded job is stale. The current job finding the record already
-- 'running' means a worker died mid-step and arq re-ran the job: that counts as a new
-- attempt (attempt + 1).
--
-- KEYS[1] enrollment hash   KEYS[2] history list
-- ARGV[1] step  ARGV[2] attempt  ARGV[3] now (ms)  ARGV[4] history entry template (JSON,
-- with "to"/"from"/"attempt"/"reason" filled here)  ARGV[5] history limit  ARGV[6] idx prefix
-- ARGV[7] enrollment id  ARGV[8] job id ('' skips the job check)
-- Returns {1, flat hash fields...} claimed | {2, flat...} re-run after a crash (attempt bumped)
--       | {0, state, step, attempt} stale | {-1} no such enrollment
local enr, hist = KEYS[1], KEYS[2]
local step, attempt = tonumber(ARGV[1]), tonumber(ARGV[2])
local cur = redis.call('HMGET', enr, 'state', 'step', 'attempt', 'campaign', 'job')
if not cur[1] then return {-1} end
local state, cstep, cattempt, campaign = cur[1], tonumber(cur[2]), tonumber(cur[3]), cur[4]
if cstep ~= step then return {0, state, cstep, cattempt} end
local job_id = ARGV[8] or ''
if job_id ~= '' and cur[5] ~= job_id then return {0, state, cstep, cattempt} end

local code, reason, new_attempt
if state == 'scheduled' and cattempt == attempt then
  code, reason, new_attempt = 1, 'job started', attempt
elseif state == 'running' and cattempt >= attempt and (job_id ~= '' or cattempt == attempt) then
  code, reason, new_attempt = 2, 'job re-run after a worker stopped mid-step', cattempt + 1
else
  return {0, state, cstep, cattempt}
end

redis.call('HSET', enr, 'state', 'running', 'attempt', new_attempt, 'updated_at', ARGV[3])
if state ~= 'running' then
  redis.call('SREM', ARGV[6] .. campaign .. ':' .. state, ARGV[7])
  redis.call('SADD', ARGV[6] .. campaign .. ':running', ARGV[7])
end
local entry = cjson.decode(ARGV[4])
entry['from'] = state
entry['to'] = 'running'
entry['attempt'] = new_attempt
entry['reason'] = reason
redis.call('RPUSH', hist, cjson.encode(entry))
redis.call('LTRIM', hist, -tonumber(ARGV[5]), -1)
local out = redis.call('HGETALL', enr)
table.insert(out, 1, code)
return out
