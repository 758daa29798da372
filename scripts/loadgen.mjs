#!/usr/bin/env node
// Open-loop RAG load generator for any OpenAI-compatible server (issue #20's serving benchmark).
//
// Requests are built from real passages (../shared/datasets: MuSiQue paragraphs and NQ-open
// contexts, with their questions): passages are packed into documents of about --doc-tokens tokens
// (measured with the server's /tokenize when it has one, else ~4 characters a token), a pool of
// --pool documents is drawn with Zipf popularity (--zipf), K (--docs) distinct documents per request
// in random order, so most reuses are not at position 0. Arrivals are Poisson at each rate of
// --rates (requests/s) for --duration-s (or --requests), with a fixed --seed. Each request streams
// its answer (--max-tokens MIN-MAX, ignore_eos so that lengths are as drawn).
//
// Per (mode, rate) it reports throughput (req/s, output tok/s), TTFT and TPOT p50/p90/p99, goodput
// at the SLO (--slo-ttft-s, --slo-tpot-ms: completed requests meeting both, per second), errors, the
// largest number of running requests and KV usage seen on /metrics, and chunk-store hits by tier and
// prefix-cache hits (/metrics deltas). --out DIR writes report.json and latency-vs-rate PNGs.
//
// RedKnot extensions are used when --redknot (default on): documents go in `documents` (reuse
// units) and each mode is sent as `reuse_mode`; with --redknot 0 the documents are put in the
// user message and --modes names only labels (one server per mode, e.g. vLLM with and without
// prefix caching).
//
//   node scripts/loadgen.mjs --url http://127.0.0.1:8080 --model redknot-rag-8k --docs 8 \
//     --doc-tokens 512 --pool 32 --rates 0.5,1,2 --duration-s 60 --modes full,prefix,redknot --out /tmp/lg
import fs from 'node:fs';
import path from 'node:path';
import zlib from 'node:zlib';

const defaults = {
  url: 'http://127.0.0.1:8080', model: '', shared: '../shared', docs: '8', 'doc-tokens': '4096',
  pool: '64', zipf: '1.1', rates: '0.5,1,2', 'duration-s': '60', requests: '0', 'max-tokens': '32-128',
  modes: 'full,prefix,redknot', seed: '1', 'slo-ttft-s': '2', 'slo-tpot-ms': '50', out: '',
  redknot: '1', 'api-key': '', 'drain-s': '600', warmup: '0',
};
const args = {...defaults};
for (let i = 2; i < process.argv.length; ++i) {
  const a = process.argv[i];
  if (!a.startsWith('--')) throw new Error(`unexpected argument ${a}`);
  const key = a.slice(2);
  if (!(key in defaults)) throw new Error(`unknown flag --${key} (known: ${Object.keys(defaults).join(', ')})`);
  args[key] = process.argv[++i];
}
const num = (k) => {
  const v = Number(args[k]);
  if (!Number.isFinite(v)) throw new Error(`--${k} must be a number, got ${args[k]}`);
  return v;
};
const [minOut, maxOut] = args['max-tokens'].split('-').map(Number);
const rates = args.rates.split(',').map(Number);
const modes = args.modes.split(',');
const redknot = args.redknot !== '0';
const headers = {'content-type': 'application/json'};
if (args['api-key']) headers.authorization = `Bearer ${args['api-key']}`;

// Seeded PRNG (mulberry32): the same seed gives the same documents, order and arrival times.
function rng(seed) {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// ---- workload ----
function loadPassages() {
  const dir = path.join(args.shared, 'datasets');
  const passages = [], questions = [];
  const mu = JSON.parse(zlib.gunzipSync(fs.readFileSync(path.join(dir, 'musique_s.json.gz'))));
  for (const q of mu) {
    questions.push(q.question);
    for (const c of q.ctxs) passages.push(`${c.title ? c.title + '\n' : ''}${c.text.trim()}`);
  }
  const nq = zlib.gunzipSync(fs.readFileSync(path.join(dir, 'nq-open-oracle.jsonl.gz'))).toString();
  for (const line of nq.split('\n')) {
    if (!line) continue;
    const q = JSON.parse(line);
    questions.push(q.question.endsWith('?') ? q.question : `${q.question}?`);
    for (const c of q.ctxs) passages.push(`${c.title ? c.title + '\n' : ''}${c.text.trim()}`);
  }
  return {passages: [...new Set(passages)], questions};
}

async function tokenCount(text) {
  try {
    const r = await fetch(`${args.url}/tokenize`, {
      method: 'POST', headers, body: JSON.stringify({model: args.model || undefined, prompt: text}),
    });
    if (r.ok) return (await r.json()).count;
  } catch {
  }
  return Math.ceil(text.length / 4);  // servers without /tokenize
}

// Documents of about `target` tokens: passages appended until the count reaches it.
async function buildDocuments(passages, n, target, rand) {
  const order = passages.map((p, i) => [rand(), i]).sort((a, b) => a[0] - b[0]).map(([, i]) => i);
  const docs = [];
  let next = 0, charsPerToken = 4;
  for (let d = 0; d < n; ++d) {
    let text = '';
    while (next < order.length && text.length < target * charsPerToken)
      text += (text ? '\n\n' : '') + passages[order[next++]];
    if (next >= order.length) throw new Error(`not enough passages for ${n} documents of ${target} tokens`);
    const tokens = await tokenCount(text);
    charsPerToken = Math.max(1, 0.7 * charsPerToken + 0.3 * (text.length / Math.max(1, tokens)));
    docs.push({text, tokens});
  }
  return docs;
}

// Zipf(s) over ranks 1..n: weights 1/r^s, drawn by inverse CDF.
function zipfSampler(n, s, rand) {
  const cdf = [];
  let total = 0;
  for (let r = 1; r <= n; ++r) cdf.push(total += 1 / Math.pow(r, s));
  return () => {
    const u = rand() * total;
    let lo = 0, hi = n - 1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (cdf[mid] < u) lo = mid + 1; else hi = mid;
    }
    return lo;
  };
}

function makeRequests(count, docs, questions, rand) {
  const pick = zipfSampler(docs.length, num('zipf'), rand);
  const k = Math.min(num('docs'), docs.length);
  const out = [];
  for (let i = 0; i < count; ++i) {
    const chosen = new Set();
    while (chosen.size < k) chosen.add(pick());
    const ids = [...chosen].map((d) => [rand(), d]).sort((a, b) => a[0] - b[0]).map(([, d]) => d);
    const maxTokens = minOut + Math.floor(rand() * (maxOut - minOut + 1));
    out.push({docs: ids, question: questions[Math.floor(rand() * questions.length)], maxTokens});
  }
  return out;
}

// ---- running ----
async function metrics() {
  try {
    const text = await (await fetch(`${args.url}/metrics`, {headers})).text();
    const get = (name, label) => {
      let sum = 0, found = false;
      for (const m of text.matchAll(new RegExp(`^${name.replace(':', '\\:')}(\\{[^}]*\\})? (\\S+)$`, 'gm'))) {
        if (label && !(m[1] ?? '').includes(label)) continue;
        sum += Number(m[2]);
        found = true;
      }
      return found ? sum : NaN;
    };
    return {
      pool: get('redknot_chunk_store_hits_total', 'tier="pool"'),
      host: get('redknot_chunk_store_hits_total', 'tier="host"'),
      disk: get('redknot_chunk_store_hits_total', 'tier="disk"'),
      misses: get('redknot_chunk_store_misses_total'),
      prefixHits: get('vllm:prefix_cache_hits_total'),
      prefixQueries: get('vllm:prefix_cache_queries_total'),
      running: get('vllm:num_requests_running'),
      kv: get('vllm:kv_cache_usage_perc'),
    };
  } catch {
    return {};
  }
}

async function runOne(req, docs, mode) {
  const documents = req.docs.map((d) => docs[d].text);
  const body = {
    model: args.model || undefined, max_tokens: req.maxTokens, temperature: 0, stream: true,
    stream_options: {include_usage: true}, ignore_eos: true,
  };
  if (redknot) {
    body.documents = documents;
    body.messages = [{role: 'user', content: req.question}];
    body.reuse_mode = mode;
  } else {
    body.messages = [{role: 'user', content: `${documents.join('\n\n')}\n\nQuestion: ${req.question}`}];
  }
  const t0 = performance.now();
  const times = [];
  let usage = null, error = null;
  try {
    const r = await fetch(`${args.url}/v1/chat/completions`, {method: 'POST', headers, body: JSON.stringify(body)});
    if (!r.ok) throw new Error(`HTTP ${r.status}: ${(await r.text()).slice(0, 200)}`);
    const decoder = new TextDecoder();
    let buf = '';
    for await (const part of r.body) {
      buf += decoder.decode(part, {stream: true});
      let nl;
      while ((nl = buf.indexOf('\n\n')) >= 0) {
        const ev = buf.slice(0, nl);
        buf = buf.slice(nl + 2);
        if (!ev.startsWith('data: ') || ev === 'data: [DONE]') continue;
        const j = JSON.parse(ev.slice(6));
        if (j.error) throw new Error(j.error.message);
        if (j.usage) usage = j.usage;
        if (j.choices?.[0]?.delta?.content) times.push(performance.now());
      }
    }
  } catch (e) {
    error = String(e.message ?? e);
  }
  const end = performance.now();
  const outTokens = usage?.completion_tokens ?? times.length;
  return {
    error, ttft: times.length ? (times[0] - t0) / 1e3 : NaN,
    tpot: outTokens > 1 && times.length ? (end - times[0]) / 1e3 / (outTokens - 1) : NaN,
    outTokens, promptTokens: usage?.prompt_tokens ?? 0,
    cached: usage?.prompt_tokens_details?.cached_tokens ?? 0, fallback: usage?.reuse?.fallback ?? null,
  };
}

const pct = (xs, p) => {
  const v = xs.filter(Number.isFinite).sort((a, b) => a - b);
  if (!v.length) return NaN;
  return v[Math.min(v.length - 1, Math.floor(p / 100 * v.length))];
};

async function runRate(mode, rate, reqs, docs, rand) {
  const before = await metrics();
  let peakRunning = 0, peakKv = 0, stop = false;
  const sampler = (async () => {
    while (!stop) {
      const m = await metrics();
      if (Number.isFinite(m.running)) peakRunning = Math.max(peakRunning, m.running);
      if (Number.isFinite(m.kv)) peakKv = Math.max(peakKv, m.kv);
      await new Promise((r) => setTimeout(r, 250));
    }
  })();
  const t0 = performance.now();
  const pending = [];
  let at = 0;
  for (const req of reqs) {
    at += -Math.log(1 - rand()) / rate;  // Poisson arrivals
    const wait = t0 + at * 1e3 - performance.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    pending.push(runOne(req, docs, mode));
  }
  let timer;
  const results = await Promise.race([
    Promise.all(pending),
    new Promise((r) => (timer = setTimeout(() => r(null), num('drain-s') * 1e3))),
  ]);
  clearTimeout(timer);
  const wall = (performance.now() - t0) / 1e3;
  stop = true;
  await sampler;
  const after = await metrics();
  if (!results) throw new Error(`${mode} at ${rate} req/s did not drain within --drain-s`);
  const ok = results.filter((r) => !r.error);
  const good = ok.filter((r) => r.ttft <= num('slo-ttft-s') && !(r.tpot * 1e3 > num('slo-tpot-ms')));
  const d = (k) => (Number.isFinite(after[k]) && Number.isFinite(before[k]) ? after[k] - before[k] : null);
  const prompt = ok.reduce((s, r) => s + r.promptTokens, 0);
  return {
    mode, rate, requests: reqs.length, completed: ok.length, errors: results.length - ok.length,
    first_error: results.find((r) => r.error)?.error ?? null,
    fallbacks: ok.filter((r) => r.fallback).length, wall_s: wall,
    throughput_rps: ok.length / wall, output_tok_s: ok.reduce((s, r) => s + r.outTokens, 0) / wall,
    goodput_rps: good.length / wall,
    ttft_s: {p50: pct(ok.map((r) => r.ttft), 50), p90: pct(ok.map((r) => r.ttft), 90), p99: pct(ok.map((r) => r.ttft), 99)},
    tpot_ms: {p50: pct(ok.map((r) => r.tpot * 1e3), 50), p90: pct(ok.map((r) => r.tpot * 1e3), 90), p99: pct(ok.map((r) => r.tpot * 1e3), 99)},
    prompt_tokens_mean: ok.length ? prompt / ok.length : 0,
    cached_fraction: prompt ? ok.reduce((s, r) => s + r.cached, 0) / prompt : 0,
    chunk_hits: {pool: d('pool'), host: d('host'), disk: d('disk'), misses: d('misses')},
    prefix_hits: d('prefixHits'), prefix_queries: d('prefixQueries'),
    peak_running: peakRunning, peak_kv_usage: peakKv,
  };
}

// ---- PNG (latency vs rate) ----
const crcTable = Array.from({length: 256}, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; ++k) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});
const crc32 = (buf) => {
  let c = 0xffffffff;
  for (const b of buf) c = crcTable[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
};
function png(width, height, rgb) {
  const chunk = (type, data) => {
    const len = Buffer.alloc(4);
    len.writeUInt32BE(data.length);
    const td = Buffer.concat([Buffer.from(type), data]);
    const crc = Buffer.alloc(4);
    crc.writeUInt32BE(crc32(td));
    return Buffer.concat([len, td, crc]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr[8] = 8, ihdr[9] = 2;  // 8-bit RGB
  const raw = Buffer.alloc((width * 3 + 1) * height);
  for (let y = 0; y < height; ++y) rgb.copy(raw, y * (width * 3 + 1) + 1, y * width * 3, (y + 1) * width * 3);
  return Buffer.concat([Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]), chunk('IHDR', ihdr),
                        chunk('IDAT', zlib.deflateSync(raw)), chunk('IEND', Buffer.alloc(0))]);
}
// One panel: a series per mode of (rate, value); log-free linear axes, the legend's colours are in
// report.json's "plot_colors". Tick marks every axis tenth (the table holds the numbers).
const colors = [[220, 50, 47], [38, 139, 210], [133, 153, 0], [211, 54, 130], [42, 161, 152], [181, 137, 0]];
function plot(rows, metric, file) {
  const W = 640, H = 400, L = 50, B = 40, T = 20, R = 20;
  const rgb = Buffer.alloc(W * H * 3, 255);
  const put = (x, y, c) => {
    if (x < 0 || y < 0 || x >= W || y >= H) return;
    const i = (Math.round(y) * W + Math.round(x)) * 3;
    rgb[i] = c[0], rgb[i + 1] = c[1], rgb[i + 2] = c[2];
  };
  const line = (x0, y0, x1, y1, c) => {
    const n = Math.max(Math.abs(x1 - x0), Math.abs(y1 - y0), 1);
    for (let i = 0; i <= n; ++i) put(x0 + (x1 - x0) * i / n, y0 + (y1 - y0) * i / n, c);
  };
  const xs = rows.map((r) => r.rate), ys = rows.map(metric).filter(Number.isFinite);
  const xmax = Math.max(...xs) * 1.05 || 1, ymax = Math.max(...ys, 1e-9) * 1.1;
  const X = (x) => L + (x / xmax) * (W - L - R), Y = (y) => H - B - (y / ymax) * (H - B - T);
  const black = [0, 0, 0];
  line(L, H - B, W - R, H - B, black);
  line(L, T, L, H - B, black);
  for (let i = 1; i <= 10; ++i) {
    line(X(xmax * i / 10), H - B, X(xmax * i / 10), H - B + 5, black);
    line(L - 5, Y(ymax * i / 10), L, Y(ymax * i / 10), black);
  }
  modes.forEach((mode, mi) => {
    const pts = rows.filter((r) => r.mode === mode && Number.isFinite(metric(r))).sort((a, b) => a.rate - b.rate);
    const c = colors[mi % colors.length];
    for (let i = 1; i < pts.length; ++i)
      for (let w = -1; w <= 1; ++w)
        line(X(pts[i - 1].rate), Y(metric(pts[i - 1])) + w, X(pts[i].rate), Y(metric(pts[i])) + w, c);
    for (const p of pts)
      for (let dx = -3; dx <= 3; ++dx)
        for (let dy = -3; dy <= 3; ++dy) put(X(p.rate) + dx, Y(metric(p)) + dy, c);
  });
  fs.writeFileSync(file, png(W, H, rgb));
  return {x_max: xmax, y_max: ymax};
}

// ---- main ----
const fmt = (x, d = 2) => (Number.isFinite(x) ? x.toFixed(d) : '-');
async function main() {
  const rand = rng(num('seed'));
  const {passages, questions} = loadPassages();
  const docs = await buildDocuments(passages, num('pool'), num('doc-tokens'), rand);
  const meanDocTokens = docs.reduce((s, d) => s + d.tokens, 0) / docs.length;
  console.log(`# ${docs.length} documents of ${fmt(meanDocTokens, 0)} tokens on average (target ${args['doc-tokens']}), ` +
              `${args.docs} per request, Zipf ${args.zipf}; ${passages.length} passages, ${questions.length} questions`);
  const rows = [];
  for (const mode of modes) {
    for (const [ri, rate] of rates.entries()) {
      // One request stream per rate, the same for every mode (caches fill across runs of one
      // server: for clean comparisons run each mode against a fresh server, --modes one at a time).
      const r2 = rng(num('seed') * 7919 + 1 + ri * 104729);
      const count = num('requests') > 0 ? num('requests') : Math.max(1, Math.round(rate * num('duration-s')));
      const reqs = makeRequests(count, docs, questions, r2);
      if (num('warmup') > 0) await Promise.all(reqs.slice(0, num('warmup')).map((q) => runOne(q, docs, mode)));
      const row = await runRate(mode, rate, reqs, docs, r2);
      rows.push(row);
      console.log(`# ${mode} @ ${rate} req/s: ${row.completed}/${row.requests} done, ${row.errors} errors` +
                  (row.first_error ? ` (${row.first_error})` : ''));
    }
  }
  console.log(`\n| mode | rate req/s | done | err | fallbacks | req/s | out tok/s | goodput req/s (TTFT<=${args['slo-ttft-s']}s, TPOT<=${args['slo-tpot-ms']}ms) ` +
              '| TTFT p50/p90/p99 s | TPOT p50/p90/p99 ms | prompt tok | cached | chunk hits pool/host/disk, misses | prefix hits | peak running | peak KV |');
  console.log('|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|');
  for (const r of rows) {
    const ch = r.chunk_hits;
    console.log(`| ${r.mode} | ${r.rate} | ${r.completed} | ${r.errors} | ${r.fallbacks} | ${fmt(r.throughput_rps)} | ` +
                `${fmt(r.output_tok_s, 1)} | ${fmt(r.goodput_rps)} | ${fmt(r.ttft_s.p50)} / ${fmt(r.ttft_s.p90)} / ${fmt(r.ttft_s.p99)} | ` +
                `${fmt(r.tpot_ms.p50, 1)} / ${fmt(r.tpot_ms.p90, 1)} / ${fmt(r.tpot_ms.p99, 1)} | ${fmt(r.prompt_tokens_mean, 0)} | ` +
                `${fmt(100 * r.cached_fraction, 1)}% | ${ch.pool ?? '-'}/${ch.host ?? '-'}/${ch.disk ?? '-'}, ${ch.misses ?? '-'} | ` +
                `${r.prefix_hits ?? '-'} | ${r.peak_running} | ${fmt(100 * r.peak_kv_usage, 1)}% |`);
  }
  if (args.out) {
    fs.mkdirSync(args.out, {recursive: true});
    const axes = {
      ttft_p50: plot(rows, (r) => r.ttft_s.p50, path.join(args.out, 'ttft_p50_vs_rate.png')),
      ttft_p99: plot(rows, (r) => r.ttft_s.p99, path.join(args.out, 'ttft_p99_vs_rate.png')),
      tpot_p50: plot(rows, (r) => r.tpot_ms.p50, path.join(args.out, 'tpot_p50_vs_rate.png')),
      goodput: plot(rows, (r) => r.goodput_rps, path.join(args.out, 'goodput_vs_rate.png')),
    };
    const plotColors = Object.fromEntries(modes.map((m, i) => [m, colors[i % colors.length]]));
    fs.writeFileSync(path.join(args.out, 'report.json'),
                     JSON.stringify({args, documents: {count: docs.length, mean_tokens: meanDocTokens}, rows,
                                     plot_colors: plotColors, plot_axes: axes}, null, 1));
    console.log(`\nwrote ${args.out}/report.json and 4 PNGs (colours: ${JSON.stringify(plotColors)})`);
  }
}

main().catch((e) => {
  console.error(`loadgen: ${e.message}`);
  process.exit(1);
});
