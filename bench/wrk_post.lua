-- wrk script for bench/service.py: POST the JSON bodies of a file (one per line) round-robin with a bearer key,
-- count every response that is not 2xx, and print one JSON line of results when the run is done.
--
--   wrk -t1 -c32 -d10s -s bench/wrk_post.lua http://127.0.0.1:8000/v1/embeddings -- bodies.jsonl KEY

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

-- per-thread state (each wrk thread has its own Lua interpreter): pre-formatted requests, a cursor, a counter
function init(args)
  local path, key = args[1], args[2]
  local headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. key}
  prepared = {}
  for line in io.lines(path) do
    if #line > 0 then
      prepared[#prepared + 1] = wrk.format("POST", nil, headers, line)
    end
  end
  assert(#prepared > 0, "no request bodies in " .. path)
  cursor = 0
  non2xx = 0
end

function request()
  cursor = cursor % #prepared + 1
  return prepared[cursor]
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  end
end

function done(summary, latency, requests)
  local non2xx_total = 0
  for _, thread in ipairs(threads) do
    non2xx_total = non2xx_total + thread:get("non2xx")
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests": %d, "duration_us": %d, "non2xx": %d, "connect_errors": %d, "read_errors": %d, '
      .. '"write_errors": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, non2xx_total, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
