#!/usr/bin/env node
// Stall benchmark: do running streams keep flowing while a request with new documents is
// prefilled? Against any running OpenAI-compatible server with RedKnot's `documents` extension.
// Starts S streaming requests (short prompts, long answers); once each has streamed a few tokens,
// sends one extra request and records, per stream, the largest gap between two tokens while the
// extra request is in flight. Two runs: the extra request brings an 8K prompt of documents never
// seen before ("new documents"), or a ~1K-token prompt without documents ("no documents", the same
// load shape). Prints one table; all loopback, bounded in count and time.
//
//   node scripts/bench-stall.mjs --url http://127.0.0.1:8080 --model redknot-rag-8k \
//     --data data/eval/rag-8k.jsonl.gz [--streams 3] [--trials 2]
import fs from 'node:fs';
import zlib from 'node:zlib';

const args = Object.fromEntries(process.argv.slice(2).reduce((acc, a, i, all) => {
  if (a.startsWith('--')) acc.push([a.slice(2), all[i + 1]]);
  return acc;
}, []));
const url = args.url ?? 'http://127.0.0.1:8080';
const model = args.model ?? 'redknot-rag-8k';
const data = args.data ?? 'data/eval/rag-8k.jsonl.gz';
const streams = Number(args.streams ?? 3);
const trials = Number(args.trials ?? 2);
const label = args.label ?? 'server';

let text = fs.readFileSync(data);
if (data.endsWith('.gz')) text = zlib.gunzipSync(text);
const samples = text.toString('utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l));

async function post(body, onToken, endpoint = 'completions') {
  const res = await fetch(`${url}/v1/${endpoint}`, {
    method: 'POST',
    headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({model, max_tokens: 64, temperature: 0, ...body}),
    signal: AbortSignal.timeout(600000),
  });
  if (!res.ok) throw new Error(`HTTP ${res.status}: ${await res.text()}`);
  if (!body.stream) return res.json();
  const reader = res.body.getReader();
  const dec = new TextDecoder();
  let buf = '';
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buf += dec.decode(value, {stream: true});
    let i;
    while ((i = buf.indexOf('\n\n')) >= 0) {
      const ev = buf.slice(0, i);
      buf = buf.slice(i + 2);
      if (ev.startsWith('data: ') && !ev.includes('[DONE]')) onToken(performance.now());
    }
  }
}

// One run: returns the largest token gap (ms) of any stream while `extra` is in flight.
async function run(extra, trial) {
  const times = [...Array(streams)].map(() => []);
  const started = [...Array(streams)].map(() => null);
  const ready = times.map((t, i) => new Promise((r) => (started[i] = r)));
  const streaming = times.map((t, i) => post(
      {prompt: `Question ${trial}-${i}: ${samples[i % samples.length].question}`, stream: true,
       max_tokens: 48},
      (now) => {
        t.push(now);
        if (t.length === 3) started[i]();
      }));
  await Promise.all(ready);
  const t0 = performance.now();
  const out = await post(extra, null, 'chat/completions');
  const t1 = performance.now();
  await Promise.all(streaming);
  let worst = 0;
  for (const t of times)
    for (let k = 1; k < t.length; ++k)
      if (t[k] >= t0 && t[k - 1] <= t1) worst = Math.max(worst, t[k] - t[k - 1]);
  return {worst, extraMs: t1 - t0, usage: out.usage};
}

const rows = [];
for (let trial = 0; trial < trials; ++trial) {
  // New documents every trial: the documents of another 8K sample (nothing cached).
  const s = samples[(trial + 1) * 7 % samples.length];
  const ask = (content) => [{role: 'user', content}];
  const docs = {messages: ask(s.question), documents: s.segments, max_tokens: 8};
  let plainText = '';
  for (const seg of s.segments) {
    if (plainText.length > 3500) break;
    plainText += seg + '\n';
  }
  const plain = {messages: ask(plainText + s.question), max_tokens: 8};
  const base = await run(plain, trial);
  const loaded = await run(docs, trial);
  rows.push({trial, base, loaded});
}
console.log(`| ${label} | trial | largest stream gap, no documents (ms) | largest stream gap, new 8K documents (ms) | ratio | new-documents request (ms) |`);
console.log('|---|---|---|---|---|---|');
for (const {trial, base, loaded} of rows)
  console.log(`| ${label} | ${trial} | ${base.worst.toFixed(0)} | ${loaded.worst.toFixed(0)} | ` +
              `${(loaded.worst / Math.max(base.worst, 1)).toFixed(2)} | ${loaded.extraMs.toFixed(0)} |`);
