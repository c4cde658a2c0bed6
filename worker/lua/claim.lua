-- Claim up to N campaign jobs of one shard for one worker, in one call: jobs whose lease
-- expired (their worker died) first, then due jobs in due order. Each claimed job is put
-- under a lease; a step's enrollment moves scheduled -> running (a re-run after an expired
-- lease counts as a new attempt). A job that is no longer its enrollment's current job is
-- stale and dropped; an entry of the wrong shape is dead-lettered with its reason.
--
-- KEYS[1] queue  KEYS[2] leases  KEYS[3] jobs  KEYS[4] dead letters
-- KEYS[5] the shard's key prefix ("<prefix>:{n}:"). Records, history and index keys are
--   named by the jobs found in the queue, so they are built from it; they share the
--   shard's hash tag, so the script still touches one cluster slot.
-- ARGV[1] max jobs  ARGV[2] now (ms)  ARGV[3] lease expiry (ms)  ARGV[4] history limit
-- ARGV[5] dead letters kept
-- Returns {next_ms, entry...}: next_ms is the earliest due time or lease expiry left (-1:
-- none); each entry is {code, job_id, score, payload_or_reason, eid, record fields...} with
-- code 1 started, 2 re-run after an expired lease, 0 stale (dropped), -1 dead-lettered,
-- -2 its enrollment's record is corrupt and was failed ({-2, job_id, score, reason, eid}).
local queue, leases, jobs, dead, base = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local limit, now, expiry = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local hist_limit, dead_keep = tonumber(ARGV[4]), tonumber(ARGV[5])
local out = {-1}

-- A new enrollment's record says how it started (created_at, its first state and node),
-- so its history list is only made at its first move, starting with that entry. (The same
-- function is in app/lua/transition.lua: scripts cannot share code.)
local function start_history(hist, enr)
  if redis.call('EXISTS', hist) == 1 then return end
  local r = redis.call('HMGET', enr, 'created_at', 'state', 'node', 'step', 'attempt')
  if not r[1] then return end
  redis.call('RPUSH', hist, cjson.encode({at = tonumber(r[1]), from = cjson.null, to = r[2],
    node = (r[3] and r[3] ~= '') and r[3] or cjson.null, step = tonumber(r[4]) or 0,
    attempt = tonumber(r[5]) or 1, reason = 'enrolled'}))
end

local function utf8_ok(s)
  if not string.find(s, '[\128-\255]') then return true end
  local i, n = 1, #s
  while i <= n do
    local c = string.byte(s, i)
    local extra
    if c < 0x80 then extra = 0
    elseif c >= 0xC2 and c <= 0xDF then extra = 1
    elseif c >= 0xE0 and c <= 0xEF then extra = 2
    elseif c >= 0xF0 and c <= 0xF4 then extra = 3
    else return false end
    for j = i + 1, i + extra do
      local cc = string.byte(s, j)
      if not cc or cc < 0x80 or cc > 0xBF then return false end
    end
    i = i + extra + 1
  end
  return true
end

local function printable(s)
  if utf8_ok(s) then return s end
  return (string.gsub(s, '[\128-\255]', function(c) return string.format('\\x%02x', string.byte(c)) end))
end

local function whole(v)
  return type(v) == 'number' and v == math.floor(v) and v >= 0 and v < 9007199254740992
end

local function null_or(v, kind)
  return v == nil or v == cjson.null or type(v) == kind
end

local function check(id, payload)
  if not utf8_ok(id) then return 'job id is not UTF-8' end
  if not utf8_ok(payload) then return 'payload is not UTF-8' end
  local ok, d = pcall(cjson.decode, payload)
  if not ok or type(d) ~= 'table' or d[1] ~= nil then return 'payload is not a JSON object' end
  if d.f ~= 'run_step' and d.f ~= 'fire_timeout' then return 'f: not a campaign job function' end
  if type(d.a) ~= 'table' or type(d.a[1]) ~= 'string' or not whole(d.a[2]) then
    return 'a: expected [enrollment_id, step, ...]'
  end
  if d.f == 'run_step' and not whole(d.a[3]) then return 'a: expected an attempt number' end
  if type(d.k) ~= 'table' or d.k[1] ~= nil or not whole(d.k.version)
      or not (d.k.campaign == nil or type(d.k.campaign) == 'string') then
    return 'k: expected campaign and version'
  end
  if not null_or(d.k.node, 'string') or not null_or(d.k.tz, 'string') then
    return 'k: node and tz must be strings'
  end
  if d.k.base ~= nil and not whole(d.k.base) then return 'k: base must be a step number' end
  if d.k.otel ~= nil and d.k.otel ~= cjson.null then
    if type(d.k.otel) ~= 'table' or d.k.otel[1] ~= nil then return 'k: otel must be an object of strings' end
    for _, v in pairs(d.k.otel) do
      if type(v) ~= 'string' then return 'k: otel must be an object of strings' end
    end
  end
  if d.t ~= nil and d.t ~= cjson.null and not whole(d.t) then return 't: not a try number' end
  if d.et ~= nil and d.et ~= cjson.null and type(d.et) ~= 'number' then
    return 'et: not a time in ms'
  end
  local eid = d.a[1]
  local campaign = d.k.campaign or string.match(eid, '^([^:]+):')
  if not campaign or string.sub(eid, 1, #campaign + 1) ~= campaign .. ':' then
    return 'a: enrollment id does not belong to the campaign'
  end
  d.campaign = campaign
  local expected = 'timeout:' .. eid .. ':' .. d.a[2]
  if d.f == 'run_step' then expected = 'step:' .. eid .. ':' .. d.a[2] .. ':' .. d.a[3] end
  if id ~= expected and string.sub(id, 1, #expected + 1) ~= expected .. '@' then
    return 'job id does not match its payload'
  end
  return nil, d
end

local function bury(id, payload, reason)
  redis.call('ZREM', leases, id)
  redis.call('HDEL', jobs, id)
  local entry = {job_id = printable(id), reason = reason, at = now / 1000}
  if payload then entry.payload = printable(string.sub(payload, 1, 4096)) end
  redis.call('LPUSH', dead, cjson.encode(entry))
  redis.call('LTRIM', dead, 0, dead_keep - 1)
  out[#out + 1] = {-1, printable(id), 0, reason}
end

local function stale(id, score)
  redis.call('ZREM', leases, id)
  redis.call('HDEL', jobs, id)
  out[#out + 1] = {0, id, score, ''}
end

local STATES = {scheduled = true, running = true, waiting = true, completed = true,
                failed = true, cancelled = true}

-- The record cannot be trusted (a field missing or of the wrong type): fail this one
-- enrollment with a named error, written here because no transition can check it.
local function fail_corrupt(id, score, eid, campaign, state, step, reason)
  local enr = base .. 'enr:' .. eid
  local hist = base .. 'hist:' .. eid
  if STATES[state] then start_history(hist, enr) end  -- from the record as it was
  redis.call('ZREM', leases, id)
  redis.call('HDEL', jobs, id)
  redis.call('HDEL', enr, 'job')
  redis.call('HSET', enr, 'state', 'failed', 'updated_at', now,
    'error', cjson.encode({type = 'CorruptRecord', message = reason, at = now}))
  for s in pairs(STATES) do redis.call('SREM', base .. 'idx:' .. campaign .. ':' .. s, eid) end
  redis.call('SADD', base .. 'idx:' .. campaign .. ':failed', eid)
  redis.call('RPUSH', hist, cjson.encode({at = now, from = STATES[state] and state or cjson.null,
    to = 'failed', node = cjson.null, step = tonumber(step) or 0, reason = 'CorruptRecord: ' .. reason}))
  redis.call('LTRIM', hist, -hist_limit, -1)
  out[#out + 1] = {-2, id, score, reason, eid}
end

local function integral(v)
  local n = tonumber(v)
  return n ~= nil and n == math.floor(n) and n >= 0 and n < 9007199254740992
end

local function start(id, score, rerun)
  local payload = redis.call('HGET', jobs, id)
  if not payload then
    bury(id, nil, 'no payload stored for this job id')
    return
  end
  local reason, d = check(id, payload)
  if reason then
    bury(id, payload, reason)
    return
  end
  local eid = d.a[1]
  local enr = base .. 'enr:' .. eid
  local rec = redis.call('HMGET', enr, 'state', 'step', 'attempt', 'job', 'campaign', 'node')
  local state, step, attempt, job, campaign, node = rec[1], rec[2], rec[3], rec[4], rec[5], rec[6]
  campaign = campaign or d.campaign  -- records keep no campaign field: the id says it
  if job ~= id then
    stale(id, score)
    return
  end
  -- Every field this script uses is checked before anything is written.
  local bad
  if not STATES[state] then bad = 'state: not an enrollment state'
  elseif not integral(step) then bad = 'step: not a step number'
  elseif campaign ~= d.campaign then bad = 'campaign: does not match the job'
  elseif d.f == 'run_step' and not (integral(attempt) and tonumber(attempt) >= 1) then
    bad = 'attempt: not an attempt number'
  elseif not utf8_ok(table.concat(redis.call('HVALS', enr), '')) then
    bad = 'a field is not UTF-8'
  end
  if bad then
    fail_corrupt(id, score, eid, d.campaign, state, step, bad)
    return
  end
  local code = rerun and 2 or 1
  if d.f == 'run_step' then
    local to_attempt, why
    if state == 'scheduled' then
      code, to_attempt, why = 1, tonumber(attempt), 'job started'
    elseif state == 'running' then
      code, to_attempt = 2, tonumber(attempt) + 1
      why = 'job re-run: the lease of the worker running it expired'
    else
      stale(id, score)
      return
    end
    local hist = base .. 'hist:' .. eid
    start_history(hist, enr)  -- from the record as it was
    redis.call('HSET', enr, 'state', 'running', 'attempt', to_attempt, 'updated_at', now)
    if state ~= 'running' then
      redis.call('SREM', base .. 'idx:' .. campaign .. ':' .. state, eid)
      redis.call('SADD', base .. 'idx:' .. campaign .. ':running', eid)
    end
    redis.call('RPUSH', hist, cjson.encode({at = now, from = state, to = 'running',
      node = (node and node ~= '') and node or cjson.null, step = tonumber(step),
      attempt = to_attempt, reason = why}))
    redis.call('LTRIM', hist, -hist_limit, -1)
  elseif state ~= 'waiting' then
    stale(id, score)
    return
  end
  redis.call('ZADD', leases, expiry, id)
  local entry = {code, id, score, payload, eid}
  local flat = redis.call('HGETALL', enr)
  for i = 1, #flat do entry[#entry + 1] = flat[i] end
  out[#out + 1] = entry
end

local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
for i = 1, #expired, 2 do
  start(expired[i], expired[i + 1], true)
end
local room = limit - #expired / 2
if room > 0 then
  local due = redis.call('ZRANGEBYSCORE', queue, '-inf', now, 'WITHSCORES', 'LIMIT', 0, room)
  for i = 1, #due, 2 do
    redis.call('ZREM', queue, due[i])
    start(due[i], due[i + 1], false)
  end
end

local nq = redis.call('ZRANGE', queue, 0, 0, 'WITHSCORES')
local nl = redis.call('ZRANGE', leases, 0, 0, 'WITHSCORES')
local next_ms = -1
if nq[2] then next_ms = tonumber(nq[2]) end
if nl[2] and (next_ms < 0 or tonumber(nl[2]) < next_ms) then next_ms = tonumber(nl[2]) end
out[1] = next_ms
return out
