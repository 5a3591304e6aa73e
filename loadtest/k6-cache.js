// k6 load script for the semantic cache: sends a pool of prompt families through the gateway and
// counts cache hits, misses and wrong hits.
//
// The pool (cache-families.json) holds families: one question and its paraphrases, which all need
// the same answer, and look-alike families that read almost the same but need another answer
// (enable/disable, A to B / B to A, another number, unit, version, language...). Requests go out at
// a constant arrival rate, in a seeded random order over the pool's members (one shuffled pass
// after another), round-robin over the TARGET gateways, so an answer cached through one instance
// has to be found through the others.
//
// llm-sim writes `[p:<first 8 hex of sha256(last user message)>]` into its answers. A hit
// (`x-llm-cache-status: hit`) replays the answer of the prompt that was stored, so its marker must
// be the hash of SOME member of the SAME family as the prompt sent; any other marker is a wrong
// hit (cache_wrong_hits), however similar the prompts read.
//
// Best possible hit ratio for what was sent: every request after the first one of its family hits,
// i.e. (requests - distinct families requested) / requests.
//
// Env:
//   TARGET     base URL(s) of the gateway(s), comma-separated; requests rotate over them  (required)
//   API_KEY    the subscription key, sent as `Authorization: Bearer`                     (required)
//   RATE       requests per second                                                      (default 20)
//   REQUESTS   requests to send; past the pool's size the passes repeat, reshuffled  (default: pool size)
//   DURATION   upper bound of the run, e.g. 30s                          (default: REQUESTS / RATE, rounded up)
//   SEED       seed of the order                                                         (default 1)
//   MODEL      the `model` of the requests                                        (default gpt-4o-mini)
//   SYSTEM     the system message sent with every prompt     (default 'You are a helpful assistant.')
//   POOL       the pool file, relative to this script                    (default cache-families.json)
//   SUMMARY    path of the JSON summary (the text summary always goes to stdout)
//
//   k6 run -e TARGET=http://127.0.0.1:8080,http://127.0.0.1:8081 -e API_KEY=$KEY -e RATE=20 loadtest/k6-cache.js
//
// Every request also records `cache_req_duration` tagged with cache_status, family, member (the
// member's index in the pool), request_id (the gateway's x-request-id) and, on hits,
// served_family / served_member (whose answer came back): with `--out json=FILE` that is a
// per-request record (bench_cache.py reads it, with the gateways' request logs, to list the
// paraphrases the cache did not serve and why).
import http from 'k6/http';
import crypto from 'k6/crypto';
import exec from 'k6/execution';
import { check } from 'k6';
import { SharedArray } from 'k6/data';
import { Counter, Trend } from 'k6/metrics';

const TARGETS = (__ENV.TARGET || '')
  .split(',')
  .map((t) => t.trim().replace(/\/+$/, ''))
  .filter((t) => t !== '');
if (TARGETS.length === 0) throw new Error('set TARGET, e.g. -e TARGET=http://127.0.0.1:8080,http://127.0.0.1:8081');
const API_KEY = __ENV.API_KEY || '';
if (!API_KEY) throw new Error('set API_KEY: the cache is partitioned by subscription');
const RATE = parseInt(__ENV.RATE || '20', 10);
if (!(RATE > 0)) throw new Error(`RATE must be a positive integer, not ${JSON.stringify(__ENV.RATE)}`);
const SEED = parseInt(__ENV.SEED || '1', 10);
const MODEL = __ENV.MODEL || 'gpt-4o-mini';
const SYSTEM = __ENV.SYSTEM === undefined ? 'You are a helpful assistant.' : __ENV.SYSTEM;
const POOL_FILE = __ENV.POOL || './cache-families.json';

// One entry per member: its text, its family and the marker llm-sim puts in its answer.
const MEMBERS = new SharedArray('members', () => {
  const pool = JSON.parse(open(POOL_FILE));
  const out = [];
  pool.families.forEach((family, f) => {
    if (!Array.isArray(family.members) || family.members.length === 0) {
      throw new Error(`family ${family.id} has no members`);
    }
    for (const text of family.members) {
      out.push({ text, family: f, familyId: family.id, hash: crypto.sha256(text, 'hex').slice(0, 8) });
    }
  });
  return out;
});
const FAMILIES = new SharedArray('families', () =>
  JSON.parse(open(POOL_FILE)).families.map((f) => ({ id: f.id, lookalikeOf: f.lookalike_of || null })),
);
const MEMBER_BY_HASH = {};
for (let i = 0; i < MEMBERS.length; i++) {
  if (MEMBER_BY_HASH[MEMBERS[i].hash] !== undefined) {
    throw new Error(`members ${MEMBER_BY_HASH[MEMBERS[i].hash]} and ${i} share the marker ${MEMBERS[i].hash}`);
  }
  MEMBER_BY_HASH[MEMBERS[i].hash] = i;
}

const REQUESTS = __ENV.REQUESTS ? parseInt(__ENV.REQUESTS, 10) : MEMBERS.length;
if (!(REQUESTS > 0)) throw new Error(`REQUESTS must be a positive integer, not ${JSON.stringify(__ENV.REQUESTS)}`);
const DURATION = __ENV.DURATION || `${Math.ceil(REQUESTS / RATE)}s`;

// x-llm-cache-status values and the counter of each.
const STATUS_COUNTERS = { hit: 'cache_hits', miss: 'cache_misses', bypass: 'cache_bypass', error: 'cache_errors' };
const STATUSES = Object.keys(STATUS_COUNTERS);

export const options = {
  scenarios: {
    cache: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: DURATION,
      preAllocatedVUs: Math.min(50, Math.max(5, Math.ceil(RATE / 10))),
      maxVUs: 200,
    },
  },
  summaryTrendStats: ['avg', 'min', 'med', 'p(50)', 'p(90)', 'p(99)', 'max'],
  // Thresholds on the tagged sub-metrics make k6 report them separately (hit vs miss latency);
  // the real targets are the last two.
  thresholds: Object.assign(
    Object.fromEntries(STATUSES.map((s) => [`cache_req_duration{cache_status:${s}}`, ['max>=0']])),
    { cache_wrong_hits: ['count==0'], http_req_failed: ['rate==0'] },
  ),
};

const counters = Object.fromEntries(STATUSES.map((s) => [s, new Counter(STATUS_COUNTERS[s])]));
const statusMissing = new Counter('cache_status_missing'); // 200 without x-llm-cache-status
const wrongHits = new Counter('cache_wrong_hits');
const lookalikeWrongHits = new Counter('cache_wrong_hits_lookalike'); // the answer of a look-alike family
const non200 = new Counter('status_non_200');
const cacheDuration = new Trend('cache_req_duration', true);
const hitScore = new Trend('cache_hit_score');
// One counter per family: distinct families requested = counters above zero (VUs share no state).
const familyRequests = FAMILIES.map((_, f) => new Counter(`cache_family_${f}`));

/** mulberry32: a small seeded PRNG, so every VU derives the same order. */
function prng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const passes = {};
/** Member index sent by global iteration `i`: pass floor(i / N) is its own shuffle of the pool. */
function memberAt(i) {
  const pass = Math.floor(i / MEMBERS.length);
  if (!passes[pass]) {
    const order = Array.from({ length: MEMBERS.length }, (_, k) => k);
    const rand = prng(SEED * 7919 + pass);
    for (let k = order.length - 1; k > 0; k--) {
      const j = Math.floor(rand() * (k + 1));
      [order[k], order[j]] = [order[j], order[k]];
    }
    passes[pass] = order;
  }
  return passes[pass][i % MEMBERS.length];
}

const PARAMS = {
  headers: { 'content-type': 'application/json', authorization: `Bearer ${API_KEY}` },
  timeout: '30s',
};

export default function () {
  const i = exec.scenario.iterationInTest;
  if (i >= REQUESTS) return;
  const m = memberAt(i);
  const member = MEMBERS[m];
  const messages = SYSTEM ? [{ role: 'system', content: SYSTEM }] : [];
  messages.push({ role: 'user', content: member.text });
  const url = `${TARGETS[i % TARGETS.length]}/v1/chat/completions`;
  const res = http.post(url, JSON.stringify({ model: MODEL, messages }), PARAMS);
  familyRequests[member.family].add(1);

  if (res.status !== 200) {
    non200.add(1);
    check(res, { 'status 200': () => false });
    return;
  }
  const status = (res.headers['X-Llm-Cache-Status'] || '').toLowerCase();
  const tags = { cache_status: status || 'none', family: member.familyId, member: String(m) };
  // Joins this record to the gateway's request log line (cache_reason: why a lookup missed).
  if (res.headers['X-Request-Id']) tags.request_id = res.headers['X-Request-Id'];
  if (!counters[status]) {
    statusMissing.add(1);
    check(res, { 'x-llm-cache-status is hit, miss, bypass or error': () => false });
  } else {
    counters[status].add(1);
  }

  let content = '';
  try {
    content = res.json('choices.0.message.content') || '';
  } catch (_) {
    content = '';
  }
  const marker = /\[p:([0-9a-f]{8})\]/.exec(content);
  if (status === 'hit') {
    const served = marker ? MEMBER_BY_HASH[marker[1]] : undefined;
    const right = served !== undefined && MEMBERS[served].family === member.family;
    tags.served_member = served === undefined ? 'unknown' : String(served);
    tags.served_family = served === undefined ? 'unknown' : MEMBERS[served].familyId;
    if (!right) {
      wrongHits.add(1);
      if (served !== undefined) {
        const a = FAMILIES[member.family];
        const b = FAMILIES[MEMBERS[served].family];
        if (a.lookalikeOf === b.id || b.lookalikeOf === a.id || (a.lookalikeOf && a.lookalikeOf === b.lookalikeOf)) {
          lookalikeWrongHits.add(1);
        }
      }
      console.warn(
        `wrong hit: sent ${JSON.stringify(member.text)} (${member.familyId}), got the answer of ` +
          (served === undefined
            ? `an unknown prompt (marker ${marker ? marker[1] : 'missing'})`
            : `${JSON.stringify(MEMBERS[served].text)} (${MEMBERS[served].familyId})`),
      );
    }
    const score = parseFloat(res.headers['X-Llm-Cache-Score'] || '');
    if (!Number.isNaN(score)) hitScore.add(score);
    check(res, {
      'hit: answer carries a pool marker': () => served !== undefined,
      'hit: answer of the same family': () => right,
      'hit: has x-llm-cache-score': () => !Number.isNaN(score),
      'hit: not answered by llm-sim': (r) => r.headers['X-Sim-Prompt-Hash'] === undefined,
    });
  } else if (status === 'miss') {
    // Answered by llm-sim for this very prompt: its marker is the prompt's own hash.
    check(res, {
      'miss: llm-sim answered this prompt': (r) =>
        r.headers['X-Sim-Prompt-Hash'] !== undefined &&
        r.headers['X-Sim-Prompt-Hash'].startsWith(member.hash) &&
        marker !== null &&
        marker[1] === member.hash,
    });
  }
  cacheDuration.add(res.timings.duration, tags);
}

function metricValue(data, name, key, fallback) {
  const m = data.metrics[name];
  if (!m || !m.values || m.values[key] === undefined) return fallback;
  return m.values[key];
}

const round = (x, digits) => (x === null || x === undefined ? null : Number(x.toFixed(digits)));
const pct = (x) => (x === null ? '–' : `${(x * 100).toFixed(1)} %`);
const ms = (x) => (x === null ? '–' : `${x.toFixed(2)} ms`);

export function handleSummary(data) {
  const count = (name) => metricValue(data, name, 'count', 0);
  const requests = count('http_reqs');
  const [hits, misses, bypass, errors] = STATUSES.map((s) => count(STATUS_COUNTERS[s]));
  const families = FAMILIES.filter((_, f) => count(`cache_family_${f}`) > 0).length;
  const hitRatio = requests ? hits / requests : null;
  const best = requests ? (requests - families) / requests : null;
  const latency = {};
  for (const s of STATUSES) {
    const name = `cache_req_duration{cache_status:${s}}`;
    const n = count(STATUS_COUNTERS[s]);
    // k6 reports 0 for the percentiles of an empty trend: none is the honest figure.
    const stat = (key) => (n ? round(metricValue(data, name, key, null), 3) : null);
    latency[s] = { count: n, p50_ms: stat('p(50)'), p99_ms: stat('p(99)'), max_ms: stat('max') };
  }
  const checks = {};
  for (const group of [data.root_group, ...(data.root_group.groups || [])]) {
    for (const c of group.checks || []) checks[c.name] = { passes: c.passes, fails: c.fails };
  }
  const summary = {
    targets: TARGETS,
    rate: RATE,
    duration: DURATION,
    seed: SEED,
    pool_families: FAMILIES.length,
    pool_members: MEMBERS.length,
    requests,
    req_per_s: metricValue(data, 'http_reqs', 'rate', 0),
    hits,
    misses,
    bypass,
    errors,
    status_missing: count('cache_status_missing'),
    non_200: count('status_non_200'),
    failed_share: metricValue(data, 'http_req_failed', 'rate', 0),
    wrong_hits: count('cache_wrong_hits'),
    wrong_hits_lookalike: count('cache_wrong_hits_lookalike'),
    families_requested: families,
    hit_ratio: round(hitRatio, 4),
    best_hit_ratio: round(best, 4),
    achieved_over_best: best ? round(hitRatio / best, 4) : null,
    hit_score_min: round(metricValue(data, 'cache_hit_score', 'min', null), 4),
    hit_score_p50: round(metricValue(data, 'cache_hit_score', 'p(50)', null), 4),
    latency,
    p50_ms: round(metricValue(data, 'http_req_duration', 'p(50)', null), 3),
    p99_ms: round(metricValue(data, 'http_req_duration', 'p(99)', null), 3),
    checks,
    dropped_iterations: count('dropped_iterations'),
  };
  const lines = [
    `Semantic cache: ${requests} requests at ${RATE}/s over ${TARGETS.length} gateway(s); pool of ` +
      `${FAMILIES.length} families, ${MEMBERS.length} members`,
    `  hits                ${hits}`,
    `  misses              ${misses}`,
    `  bypass / error      ${bypass} / ${errors}` + (summary.status_missing ? ` (no status header: ${summary.status_missing})` : ''),
    `  hit ratio           ${pct(hitRatio)}`,
    `  best possible       ${pct(best)}  ((${requests} requests - ${families} families requested) / ${requests})`,
    `  achieved / best     ${pct(summary.achieved_over_best)}`,
    `  wrong hits          ${summary.wrong_hits}` +
      (summary.wrong_hits ? ` (${summary.wrong_hits_lookalike} from a look-alike family)` : ''),
    `  non-200 answers     ${summary.non_200}`,
    `  hit  p50 / p99      ${ms(latency.hit.p50_ms)} / ${ms(latency.hit.p99_ms)}`,
    `  miss p50 / p99      ${ms(latency.miss.p50_ms)} / ${ms(latency.miss.p99_ms)}`,
    `  hit score min / p50 ${summary.hit_score_min ?? '–'} / ${summary.hit_score_p50 ?? '–'}`,
  ];
  if (summary.dropped_iterations) lines.push(`  dropped iterations  ${summary.dropped_iterations}`);
  const out = { stdout: lines.join('\n') + '\n' };
  if (__ENV.SUMMARY) out[__ENV.SUMMARY] = JSON.stringify(summary, null, 2) + '\n';
  return out;
}
