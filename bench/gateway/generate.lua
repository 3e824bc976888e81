-- wrk script: POST /generate with a unique generation_request_id per request (a repeated id would
-- be answered from the idempotency record instead of creating and enqueueing a job), counting the
-- answers by status. Used by `python -m bench.gateway`; the key comes from STEMGEN_BENCH_KEY.

local threads = {}
local counter = 0
local key = os.getenv("STEMGEN_BENCH_KEY") or ""
local run = os.getenv("STEMGEN_BENCH_RUN") or "run"

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  accepted, other, statuses = 0, 0, {}
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  if key ~= "" then wrk.headers["Authorization"] = "Bearer " .. key end
end

function request()
  counter = counter + 1
  local body = string.format(
    '{"generation_request_id":"bench-%s-%d-%d","audio_file_id":"audio-%d",' ..
    '"target_stems":["guitar","bass","drums"],"callback_url":"http://127.0.0.1:9/callback",' ..
    '"parameters":{"target_bpm":120.0,"duration_seconds":10.0,"style":"rock",' ..
    '"prompt":"energetic rock"}}', run, tid, counter, counter)
  return wrk.format(nil, "/generate", nil, body)
end

function response(status, headers, body)
  if status == 202 then
    accepted = accepted + 1
  else
    other = other + 1
    statuses[status] = (statuses[status] or 0) + 1
  end
end

function done(summary, latency, requests)
  local acc, oth, by = 0, 0, {}
  for _, thread in ipairs(threads) do
    acc = acc + thread:get("accepted")
    oth = oth + thread:get("other")
    local s = thread:get("statuses")
    for code, n in pairs(s) do by[code] = (by[code] or 0) + n end
  end
  local seconds = summary.duration / 1e6
  io.write(string.format("STEMGEN requests=%d accepted=%d other=%d seconds=%.3f\n",
                         summary.requests, acc, oth, seconds))
  io.write(string.format("STEMGEN errors connect=%d read=%d write=%d timeout=%d status=%d\n",
                         summary.errors.connect, summary.errors.read, summary.errors.write,
                         summary.errors.timeout, summary.errors.status))
  for code, n in pairs(by) do io.write(string.format("STEMGEN status %s=%d\n", code, n)) end
  for _, p in ipairs({50, 90, 99, 99.9}) do
    io.write(string.format("STEMGEN latency p%s=%.3f\n", p, latency:percentile(p) / 1000.0))
  end
  io.write(string.format("STEMGEN latency max=%.3f mean=%.3f\n", latency.max / 1000.0, latency.mean / 1000.0))
end
