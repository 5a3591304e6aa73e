// k6 load script: POST /v1/chat/completions against TARGET (the gateway or llm-sim directly).
//
// Env:
//   TARGET    base URL, e.g. http://127.0.0.1:8080                     (required)
//   API_KEY   subscription key, sent as the `api-key` header; omitted when unset (llm-sim needs none)
//   MODE      `vus` (closed model: constant VUs) or `rate` (open model: constant arrival rate)
//   VUS       VUs for MODE=vus                                          (default 32)
//   RATE      requests per second for MODE=rate                        (default 1000)
//   DURATION  run length                                                (default 10s)
//   SUMMARY   path of the JSON summary written by handleSummary          (default: stdout)
//
//   k6 run -q -e TARGET=http://127.0.0.1:8080 -e API_KEY=... -e MODE=rate -e RATE=500 loadtest/k6/passthrough.js
import http from 'k6/http';
import { check } from 'k6';

const TARGET = (__ENV.TARGET || '').replace(/\/+$/, '');
if (!TARGET) {
  throw new Error('set TARGET, e.g. -e TARGET=http://127.0.0.1:8080');
}
const API_KEY = __ENV.API_KEY || '';
const MODE = __ENV.MODE || 'vus';
const DURATION = __ENV.DURATION || '10s';
const VUS = parseInt(__ENV.VUS || '32', 10);
const RATE = parseInt(__ENV.RATE || '1000', 10);

function scenario() {
  if (MODE === 'vus') {
    return { executor: 'constant-vus', vus: VUS, duration: DURATION };
  }
  if (MODE === 'rate') {
    return {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: DURATION,
      preAllocatedVUs: 50,
      maxVUs: 200,
    };
  }
  throw new Error(`MODE must be "vus" or "rate", not ${JSON.stringify(MODE)}`);
}

export const options = {
  scenarios: { passthrough: scenario() },
  // p(50) etc. must be listed here to show up in the summary data.
  summaryTrendStats: ['avg', 'min', 'med', 'p(50)', 'p(90)', 'p(99)', 'max'],
  // Bodies are kept: the check looks for "usage". Connections are reused (keep-alive).
};

const URL = `${TARGET}/v1/chat/completions`;
const BODY = JSON.stringify({
  model: 'gpt-4o-mini',
  messages: [{ role: 'user', content: 'Hello! Say something short.' }],
});
const HEADERS = { 'content-type': 'application/json' };
if (API_KEY) HEADERS['api-key'] = API_KEY;
const PARAMS = { headers: HEADERS, timeout: '10s' };

export default function () {
  const res = http.post(URL, BODY, PARAMS);
  check(res, {
    'status is 200': (r) => r.status === 200,
    'body has usage': (r) => typeof r.body === 'string' && r.body.includes('"usage"'),
  });
}

function metricValue(data, name, key, fallback) {
  const m = data.metrics[name];
  if (!m || !m.values || m.values[key] === undefined) return fallback;
  return m.values[key];
}

export function handleSummary(data) {
  const dur = (k) => metricValue(data, 'http_req_duration', k, null);
  const checksPassed = metricValue(data, 'checks', 'passes', 0);
  const checksFailed = metricValue(data, 'checks', 'fails', 0);
  const summary = {
    target: TARGET,
    mode: MODE,
    vus: MODE === 'vus' ? VUS : null,
    rate: MODE === 'rate' ? RATE : null,
    duration: DURATION,
    requests: metricValue(data, 'http_reqs', 'count', 0),
    req_per_s: metricValue(data, 'http_reqs', 'rate', 0),
    p50_ms: dur('p(50)'),
    p90_ms: dur('p(90)'),
    p99_ms: dur('p(99)'),
    max_ms: dur('max'),
    avg_ms: dur('avg'),
    failed_share: metricValue(data, 'http_req_failed', 'rate', 0),
    checks_failed_share: checksPassed + checksFailed > 0 ? checksFailed / (checksPassed + checksFailed) : 0,
    dropped_iterations: metricValue(data, 'dropped_iterations', 'count', 0),
    max_vus: metricValue(data, 'vus_max', 'max', null),
  };
  const text = JSON.stringify(summary, null, 2) + '\n';
  if (__ENV.SUMMARY) return { [__ENV.SUMMARY]: text };
  return { stdout: text };
}
