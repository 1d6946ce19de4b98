-- wrk script for scripts/load: every request plays one of LOAD_KEYS
-- clients, named by the X-Forwarded-For a trusted proxy would write. The
-- keys are walked in turn, so each client asks at the same steady rate.
-- Counts responses by status per thread; `done` prints the totals.

local keys = tonumber(os.getenv("LOAD_KEYS") or "10000")
local threads = {}
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  counter = id * 7919
  statuses = {}
end

function request()
  counter = counter + 1
  local k = counter % keys
  local ip = string.format("10.%d.%d.%d",
    math.floor(k / 65536) % 256, math.floor(k / 256) % 256, k % 256)
  return wrk.format("GET", "/", { ["X-Forwarded-For"] = ip })
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local totals = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      totals[status] = (totals[status] or 0) + n
    end
  end
  for status, n in pairs(totals) do
    io.write(string.format("wrk_status %d %d\n", status, n))
  end
  io.write(string.format("wrk_errors connect=%d read=%d write=%d timeout=%d status=%d\n",
    summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.timeout, summary.errors.status))
end
