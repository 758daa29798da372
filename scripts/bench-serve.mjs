#!/usr/bin/env node
// Serving benchmark client: a RAG workload against a running `redknot serve`. Requests draw
// documents from a shared pool (the documents of a RAG JSONL file) at random positions, so the
// same document recurs at different places; each request streams its answer. Per reuse mode
// (sent as the request's `reuse_mode`) it reports TTFT and TPOT p50/p99, throughput, errors and
// the chunk-store hit rate (from /metrics deltas).
//
//   node scripts/bench-serve.mjs --url http://127.0.0.1:8080 --model redknot-rag-8k \
//     --data data/eval/rag-4k.jsonl.gz --requests 32 --concurrency 4 --docs 4 --modes full,naive,redknot
import fs from 'node:fs';
import zlib from 'node:zlib';

const args = Object.fromEntries(process.argv.slice(2).reduce((acc, a, i, all) => {
  if (a.startsWith('--')) acc.push([a.slice(2), all[i + 1]]);
  return acc;
}, []));
const url = args.url ?? 'http://127.0.0.1:8080';
const model = args.model ?? 'redknot-rag-8k';
const data = args.data ?? 'data/eval/rag-4k.jsonl.gz';
const requests = Number(args.requests ?? 32);
const concurrency = Number(args.concurrency ?? 4);
const docsPerRequest = Number(args.docs ?? 4);
const maxTokens = Number(args['max-tokens'] ?? 8);
const modes = (args.modes ?? 'full,naive,redknot').split(',');
const deadlineMs = Number(args['time-limit-s'] ?? 600) * 1000;
let seed = Number(args.seed ?? 1);
const rand = () => ((seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648);

let text = fs.readFileSync(data);
if (data.endsWith('.gz')) text = zlib.gunzipSync(text);
const samples = text.toString('utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l));
// The shared document pool (--pool N keeps the first N distinct documents: smaller pools recur more).
const pool = [...new Set(samples.flatMap((s) => s.segments))].slice(0, Number(args.pool ?? 1e9));
const questions = samples.map((s) => s.question);

async function metric(name) {
  const t = await (await fetch(`${url}/metrics`)).text();
  let sum = 0;
  for (const m of t.matchAll(new RegExp(`^${name}(?:\\{[^}]*\\})? (\\S+)$`, 'gm'))) sum += Number(m[1]);
  return sum;
}

async function one(mode) {
  const documents = Array.from({length: docsPerRequest}, () => pool[Math.floor(rand() * pool.length)]);
  const question = questions[Math.floor(rand() * questions.length)];
  const t0 = performance.now();
  const res = await fetch(`${url}/v1/chat/completions`, {
    method: 'POST',
    headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({model, documents, messages: [{role: 'user', content: question}],
                          max_tokens: maxTokens, temperature: 0, stream: true, reuse_mode: mode}),
  });
  if (!res.ok) return {error: `HTTP ${res.status}`};
  const times = [];
  const decoder = new TextDecoder();
  let buf = '';
  for await (const chunk of res.body) {
    buf += decoder.decode(chunk, {stream: true});
    let i;
    while ((i = buf.indexOf('\n\n')) >= 0) {
      const ev = buf.slice(0, i);
      buf = buf.slice(i + 2);
      if (!ev.startsWith('data: ') || ev === 'data: [DONE]') continue;
      const j = JSON.parse(ev.slice(6));
      if (j.error) return {error: j.error.message};
      if (j.choices?.[0]?.delta?.content) times.push(performance.now());
    }
  }
  if (!times.length) return {ttft: performance.now() - t0, tpot: 0, tokens: 0};
  const tpot = times.length > 1 ? (times.at(-1) - times[0]) / (times.length - 1) : 0;
  return {ttft: times[0] - t0, tpot, tokens: times.length};
}

const pct = (v, q) => {
  if (!v.length) return 0;
  const s = [...v].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(q * (s.length - 1) + 0.5))];
};

const started = performance.now();
console.log(`# ${requests} requests per mode, concurrency ${concurrency}, ${docsPerRequest} documents ` +
            `each from a pool of ${pool.length}, ${maxTokens} tokens out, ${url}`);
console.log('| mode | ok | errors | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | req/s | tok/s | chunk-store hit rate |');
console.log('|---|---|---|---|---|---|---|---|---|---|');
let failures = 0;
for (const mode of modes) {
  const hits0 = await metric('redknot_chunk_store_hits_total');
  const miss0 = await metric('redknot_chunk_store_misses_total');
  const results = [];
  let next = 0;
  const t0 = performance.now();
  await Promise.all(Array.from({length: concurrency}, async () => {
    while (next < requests && performance.now() - started < deadlineMs) {
      ++next;
      try {
        results.push(await one(mode));
      } catch (e) {
        results.push({error: String(e)});
      }
    }
  }));
  const secs = (performance.now() - t0) / 1000;
  const ok = results.filter((r) => !r.error);
  const errors = results.length - ok.length;
  failures += errors;
  const hits = (await metric('redknot_chunk_store_hits_total')) - hits0;
  const misses = (await metric('redknot_chunk_store_misses_total')) - miss0;
  const tokens = ok.reduce((a, r) => a + r.tokens, 0);
  const f = (x) => x.toFixed(1);
  console.log(`| ${mode} | ${ok.length} | ${errors} | ${f(pct(ok.map((r) => r.ttft), 0.5))} | ` +
              `${f(pct(ok.map((r) => r.ttft), 0.99))} | ${f(pct(ok.map((r) => r.tpot), 0.5))} | ` +
              `${f(pct(ok.map((r) => r.tpot), 0.99))} | ${(ok.length / secs).toFixed(2)} | ` +
              `${(tokens / secs).toFixed(1)} | ` +
              `${hits + misses ? (hits / (hits + misses)).toFixed(2) : '-'} |`);
  for (const r of results.filter((r) => r.error).slice(0, 3)) console.log(`  error: ${r.error}`);
}
process.exit(failures ? 1 : 0);
