-- wrk script of the serving benchmark: each connection POSTs request bodies built beforehand (multipart or
-- JSON, one file per image), closed loop, round-robin through the images; done() writes a JSON summary.
--
-- Configured by environment variables (set by bench/serving/wrk.py):
--   BENCH_INDEX         a file listing one body file per line (the images, in order)
--   BENCH_CONTENT_TYPE  the Content-Type header of every request
--   BENCH_PATH          path and query of the classify endpoint
--   BENCH_THREADS       wrk's thread count (each thread starts at its own offset in the images)
--   BENCH_OUT           where done() writes the summary (requests, errors by kind, latency percentiles)
--   BENCH_RECORDS       optional: where done() writes one line per request, "start_s,latency_ms,status".
--                       Run with one connection per thread then (-t = -c): a thread's answers then come back
--                       in the order of its requests, so each answer is matched to its own start time.

local index_path = assert(os.getenv("BENCH_INDEX"), "BENCH_INDEX is not set")
local content_type = assert(os.getenv("BENCH_CONTENT_TYPE"), "BENCH_CONTENT_TYPE is not set")
local path = assert(os.getenv("BENCH_PATH"), "BENCH_PATH is not set")
local out_path = assert(os.getenv("BENCH_OUT"), "BENCH_OUT is not set")
local threads = tonumber(os.getenv("BENCH_THREADS") or "1")
local records_path = os.getenv("BENCH_RECORDS")

-- The main Lua state sees every thread (setup runs there); each thread has its own state for the rest.
local all_threads = {}

function setup(thread)
  thread:set("thread_id", #all_threads)
  table.insert(all_threads, thread)
end

-- Per thread: every request is formatted once, here, so sending costs a table look-up.
local prepared = {}
local count = 0
local cursor = 0

function init(args)
  for line in io.lines(index_path) do
    local f = assert(io.open(line, "rb"))
    local body = f:read("*a")
    f:close()
    count = count + 1
    prepared[count] = wrk.format("POST", path, { ["Content-Type"] = content_type }, body)
  end
  assert(count > 0, "no request bodies listed in " .. index_path)
  cursor = math.floor((thread_id or 0) * count / threads) % count
end

function request()
  cursor = cursor % count + 1
  return prepared[cursor]
end

if records_path then
  local ffi = require("ffi")
  ffi.cdef([[
    typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
    int clock_gettime(int clk_id, bench_timespec *tp);
  ]])
  local ts = ffi.new("bench_timespec")
  local function now()
    ffi.C.clock_gettime(0, ts) -- CLOCK_REALTIME: comparable with Python's time.time()
    return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
  end
  local started = 0
  records = {} -- global: done() reads it from each thread with thread:get
  local next_request = request
  request = function()
    started = now()
    return next_request()
  end
  function response(status, headers, body)
    records[#records + 1] = string.format("%.6f,%.3f,%d", started, (now() - started) * 1000, status)
  end
end

-- wrk's statistics are NaN or out of range without enough answers (a standard deviation of one value);
-- JSON has no NaN, and the harness refuses a cell without answers anyway.
local function finite(x)
  if x ~= x or x == math.huge or x == -math.huge then
    return 0
  end
  return x
end

function done(summary, latency, requests)
  local e = summary.errors
  local answered = summary.requests > 0
  local f = assert(io.open(out_path, "w"))
  f:write(string.format(
    '{"duration_us": %d, "requests": %d, "bytes": %d, '
      .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
      .. '"latency_us": {"min": %d, "max": %d, "mean": %.3f, "stdev": %.3f, '
      .. '"p50": %d, "p90": %d, "p95": %d, "p99": %d, "p999": %d}}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    answered and latency.min or 0, answered and latency.max or 0, finite(latency.mean), finite(latency.stdev),
    latency:percentile(50), latency:percentile(90), latency:percentile(95), latency:percentile(99),
    latency:percentile(99.9)
  ))
  f:close()
  if records_path then
    local r = assert(io.open(records_path, "w"))
    for _, thread in ipairs(all_threads) do
      for _, line in ipairs(thread:get("records") or {}) do
        r:write(line, "\n")
      end
    end
    r:close()
  end
end
