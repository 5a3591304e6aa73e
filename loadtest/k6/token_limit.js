// k6 load script: drives ONE subscription past its token-limit (tokens per minute) and reports
// how many tokens the gateway let through, against the configured limit.
//
// Open model (constant arrival rate): RATE requests per second for DURATION, whatever the
// answers. A 200 is "admitted" (its usage.total_tokens are summed), a 429 is "limited" (it must
// carry Retry-After); anything else is a failure (http_req_failed counts only those).
//
// Env:
//   TARGET      base URL, e.g. http://127.0.0.1:8080 (the API's path prefix included)     (required)
//   API_KEY     the subscription's key, sent as `api-key`                                   (required)
//   RATE        requests per second                                                        (default 100)
//   DURATION    run length, e.g. 20s, 1m, 1m30s                                            (default 20s)
//   LIMIT       the tokens-per-minute configured for the subscription, for the report only  (required)
//   PROMPT      the user message                                  (default 'Hello! Say something short.')
//   MAX_TOKENS  sets max_tokens in the body when given (else the policy reserves default-completion-tokens)
//   SUMMARY     path of the JSON summary written by handleSummary                          (default: stdout)
//
//   k6 run -q -e TARGET=http://127.0.0.1:8080 -e API_KEY=... -e RATE=100 -e DURATION=20s -e LIMIT=20000 \
//       loadtest/k6/token_limit.js
import http from 'k6/http';
import { check } from 'k6';
import { Counter, Rate } from 'k6/metrics';

const TARGET = (__ENV.TARGET || '').replace(/\/+$/, '');
if (!TARGET) throw new Error('set TARGET, e.g. -e TARGET=http://127.0.0.1:8080');
const API_KEY = __ENV.API_KEY || '';
if (!API_KEY) throw new Error('set API_KEY: the token limit is counted per subscription');
const LIMIT = parseInt(__ENV.LIMIT || '', 10);
if (!(LIMIT > 0)) throw new Error('set LIMIT to the configured tokens-per-minute, e.g. -e LIMIT=20000');
const RATE = parseInt(__ENV.RATE || '100', 10);
const DURATION = __ENV.DURATION || '20s';
const PROMPT = __ENV.PROMPT || 'Hello! Say something short.';
const MAX_TOKENS = __ENV.MAX_TOKENS ? parseInt(__ENV.MAX_TOKENS, 10) : null;

/** Seconds of a k6 duration such as 20s, 1m30s, 500ms, 1h. */
function durationSeconds(text) {
  const re = /(\d+(?:\.\d+)?)(ms|h|m|s)/g;
  let total = 0;
  let consumed = 0;
  let m;
  while ((m = re.exec(text)) !== null) {
    const n = parseFloat(m[1]);
    total += m[2] === 'ms' ? n / 1000 : m[2] === 's' ? n : m[2] === 'm' ? n * 60 : n * 3600;
    consumed += m[0].length;
  }
  if (consumed !== text.length || total <= 0) throw new Error(`DURATION ${JSON.stringify(text)} is not like 20s or 1m30s`);
  return total;
}
const DURATION_S = durationSeconds(DURATION);

export const options = {
  scenarios: {
    token_limit: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: DURATION,
      preAllocatedVUs: Math.min(50, Math.max(10, Math.ceil(RATE / 10))),
      maxVUs: 200,
    },
  },
  summaryTrendStats: ['avg', 'min', 'med', 'p(50)', 'p(90)', 'p(99)', 'max'],
};

// A 429 is an expected answer here: http_req_failed then counts only the other failures.
http.setResponseCallback(http.expectedStatuses(200, 429));

const admittedTokens = new Counter('admitted_tokens');
const limited = new Rate('rate_limited'); // share of answers that are 429
const status200 = new Counter('status_200');
const status429 = new Counter('status_429');
const statusOther = new Counter('status_other');

const URL = `${TARGET}/v1/chat/completions`;
const body = { model: 'gpt-4o-mini', messages: [{ role: 'user', content: PROMPT }] };
if (MAX_TOKENS !== null) body.max_tokens = MAX_TOKENS;
const BODY = JSON.stringify(body);
const PARAMS = { headers: { 'content-type': 'application/json', 'api-key': API_KEY }, timeout: '10s' };

export default function () {
  const res = http.post(URL, BODY, PARAMS);
  limited.add(res.status === 429);
  if (res.status === 200) {
    status200.add(1);
    let usage = null;
    try {
      usage = res.json('usage');
    } catch (_) {
      usage = null;
    }
    const total = usage && typeof usage.total_tokens === 'number' ? usage.total_tokens : null;
    if (total !== null) admittedTokens.add(total);
    check(res, {
      '200 has usage.total_tokens': () => total !== null,
      '200 has x-tokens-consumed = usage.total_tokens': (r) =>
        total !== null && r.headers['X-Tokens-Consumed'] === String(total),
    });
  } else if (res.status === 429) {
    status429.add(1);
    check(res, { '429 has Retry-After': (r) => /^\d+$/.test(r.headers['Retry-After'] || '') });
  } else {
    statusOther.add(1);
  }
}

function metricValue(data, name, key, fallback) {
  const m = data.metrics[name];
  if (!m || !m.values || m.values[key] === undefined) return fallback;
  return m.values[key];
}

export function handleSummary(data) {
  const dur = (k) => metricValue(data, 'http_req_duration', k, null);
  const checks = {};
  for (const group of [data.root_group, ...(data.root_group.groups || [])]) {
    for (const c of group.checks || []) checks[c.name] = { passes: c.passes, fails: c.fails };
  }
  const requests = metricValue(data, 'http_reqs', 'count', 0);
  const admitted = metricValue(data, 'admitted_tokens', 'count', 0);
  const minutes = DURATION_S / 60;
  const perMinute = admitted / minutes;
  const summary = {
    target: TARGET,
    rate: RATE,
    duration: DURATION,
    duration_s: DURATION_S,
    test_run_duration_ms: data.state ? data.state.testRunDurationMs : null,
    requests,
    req_per_s: metricValue(data, 'http_reqs', 'rate', 0),
    status_200: metricValue(data, 'status_200', 'count', 0),
    status_429: metricValue(data, 'status_429', 'count', 0),
    status_other: metricValue(data, 'status_other', 'count', 0),
    share_429: metricValue(data, 'rate_limited', 'rate', 0),
    admitted_tokens: admitted,
    admitted_tokens_per_minute: perMinute,
    limit_tokens_per_minute: LIMIT,
    ratio_admitted_per_minute_to_limit: perMinute / LIMIT,
    // Failures other than 429 (timeouts, 5xx, other 4xx).
    failed_share: metricValue(data, 'http_req_failed', 'rate', 0),
    checks,
    retry_after_missing: (checks['429 has Retry-After'] || { fails: 0 }).fails,
    p50_ms: dur('p(50)'),
    p99_ms: dur('p(99)'),
    max_ms: dur('max'),
    dropped_iterations: metricValue(data, 'dropped_iterations', 'count', 0),
  };
  const text = JSON.stringify(summary, null, 2) + '\n';
  if (__ENV.SUMMARY) return { [__ENV.SUMMARY]: text };
  return { stdout: text };
}
