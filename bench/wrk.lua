-- One endpoint, set by the environment, for bench/run.py. Prints one line,
-- BENCH {...}, with the figures run.py reads.
local method = os.getenv("BENCH_METHOD") or "GET"
local path = os.getenv("BENCH_PATH") or "/health"
local body = os.getenv("BENCH_BODY")
local key = os.getenv("BENCH_KEY")
local prefix = os.getenv("BENCH_EMAILS")  -- set: upsert rotating emails
local headers = {}
if key then headers["X-Api-Key"] = key end
if body or prefix then headers["Content-Type"] = "application/json" end
local n = 0

request = function()
  if prefix then
    -- Each email is sent twice in a row: one insert, then one update.
    n = n + 1
    local b = string.format('{"email":"%s%d@example.com","name":"user %d"}', prefix, math.floor(n / 2), n)
    return wrk.format(method, path, headers, b)
  end
  return wrk.format(method, path, headers, body)
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"non2xx":%d,"socket_errors":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout))
end
