-- wrk script for benches/run: method, body and headers come from the environment
-- (BENCH_METHOD, BENCH_BODY, BENCH_HEADERS as "Name: value" lines); BENCH_SESSIONS (comma-
-- separated Mcp-Session-Id values) makes successive requests cycle through those sessions, as
-- many clients would. done() prints one JSON line.
wrk.method = os.getenv("BENCH_METHOD") or "GET"
local body = os.getenv("BENCH_BODY") or ""
if body ~= "" then
  wrk.body = body
end
for line in (os.getenv("BENCH_HEADERS") or ""):gmatch("[^\n]+") do
  local name, value = line:match("^([^:]+):%s*(.*)$")
  if name then
    wrk.headers[name] = value
  end
end

local sessions = {}
for s in (os.getenv("BENCH_SESSIONS") or ""):gmatch("[^,]+") do
  table.insert(sessions, s)
end
if #sessions > 0 then
  local requests, n = {}, 0
  init = function(args)
    for i, s in ipairs(sessions) do
      wrk.headers["Mcp-Session-Id"] = s
      requests[i] = wrk.format()
    end
  end
  request = function()
    n = n % #requests + 1
    return requests[n]
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'JSON {"requests":%d,"duration_us":%d,"errors":%d,"non2xx":%d,"p50":%d,"p99":%d,"p999":%d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
