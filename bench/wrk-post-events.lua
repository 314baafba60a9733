-- wrk script: posts ~1 KB events with distinct ids to POST /v1/events, closed loop (each
-- connection sends its next event when the previous answer has arrived).
--
--   wrk -t2 -c32 -d20s --latency --timeout 10s -s bench/wrk-post-events.lua \
--       -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8080/v1/events -- RUN SIZE
--
-- RUN makes the ids distinct across runs on one database (default: the start time); SIZE
-- is the approximate body size in bytes (default 1024). Event ids are RUN-THREAD-N.
-- `hookwarden bench deliver --closed-loop-wrk` runs this script itself (the copy built
-- into it) and reads the `hookwarden-wrk` line `done` prints: only answers 202 count as
-- accepted, every other status as refused.

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local threads = {}

function setup(thread)
  thread:set("thread_number", #threads)
  table.insert(threads, thread)
end

function init(args)
  run = args[1] or tostring(os.time())
  local size = tonumber(args[2] or "1024")
  sent, accepted, refused = 0, 0, 0
  local unpadded = #string.format(
    '{"id":"%s-%d-%d","source":"bench","type":"order.created","data":{"order_id":%d,"total":1234,"padding":""}}',
    run, thread_number, 0, 0)
  padding = string.rep("x", math.max(0, size - unpadded - 6))
end

function request()
  sent = sent + 1
  local body = string.format(
    '{"id":"%s-%d-%d","source":"bench","type":"order.created","data":{"order_id":%d,"total":1234,"padding":"%s"}}',
    run, thread_number, sent, sent, padding)
  return wrk.format(nil, nil, nil, body)
end

function response(status, headers, body)
  if status == 202 then
    accepted = accepted + 1
  else
    refused = refused + 1
  end
end

function done(summary, latency, requests)
  local total_accepted, total_refused = 0, 0
  for _, thread in ipairs(threads) do
    total_accepted = total_accepted + thread:get("accepted")
    total_refused = total_refused + thread:get("refused")
  end
  local e = summary.errors
  io.write(string.format(
    "hookwarden-wrk requests=%d accepted=%d refused=%d duration_us=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d connect_errors=%d read_errors=%d write_errors=%d timeouts=%d\n",
    summary.requests, total_accepted, total_refused, summary.duration,
    math.floor(latency:percentile(50)), math.floor(latency:percentile(90)),
    math.floor(latency:percentile(99)), math.floor(latency.max),
    e.connect, e.read, e.write, e.timeout))
end
