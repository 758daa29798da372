// `redknot serve --tensor-parallel-size N` on the shipped model (docs/tensor-parallel.md): the
// scheduler plans on rank 0 and every rank runs its steps, so greedy answers at TP=2 and TP=4
// equal TP=1's, solo and under concurrent load, for plain completions, chat with documents (a
// reuse-mode request, served full without a per-rank chunk store and reported so) and n > 1.
// What is not run yet is refused at startup with the reason. Plain fetch, no npm packages.
// Env: REDKNOT_CLI.
import assert from 'node:assert/strict';
import {spawnSync} from 'node:child_process';
import {existsSync} from 'node:fs';
import {dirname, join} from 'node:path';
import {fileURLToPath} from 'node:url';
import {after, before, describe, test} from 'node:test';

import {startServer as startServerAt, stop, waitFor} from './serve_process.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const CLI = process.env.REDKNOT_CLI;
const MODEL = join(here, '..', '..', 'models', 'redknot-rag-8k');
// Skipped only outside ctest (no REDKNOT_CLI); under ctest a missing binary or model fails.
const skip = CLI ? false : 'REDKNOT_CLI not set (ctest sets it)';
// The same pool per rank at every size (a rank's pages hold its heads only); chunk store off.
const FLAGS = ['--reuse-mode', 'off', '--max-batch', '8'];
const BUDGET = 64 << 20;
// 189 pages per rank at TP=2: two or three of the requests below at once, so admission (by the
// fullest rank's need) holds the others back.
const TIGHT = 3 << 20;

function startServer(tp, budget = BUDGET) {
  return startServerAt(CLI, MODEL, [...FLAGS, '--tensor-parallel-size', String(tp), '--kv-budget',
                                    String(budget)]);
}

// A long first document (~1K tokens): the profile's local heads (window 256) keep part of it, so
// ranks holding different head classes need different page counts.
const FILLER = Array.from({length: 14}, (_, i) =>
    `Person ${i} named Velo Drask${i} was born in Harn${i} in ${1950 + i}. Friends describe ` +
    `Drask${i} as calm and patient. These days Velo Drask${i} works for Quell${i} Systems.`).join(' ');
const DOCS = [
  FILLER + ' Zorbin Kell was born in Quoshtrathia in 1961. Zorbin Kell has a pet owl called ' +
      'Shamso. These days Zorbin Kell works for Traibu Energy.',
  'Annual report of Traibu Energy. The company employs about 650 people. Traibu Energy was ' +
      'founded in 1939 by Drasker Poxdryt. The headquarters of Traibu Energy are in Vornheim.',
];
const QUESTIONS = [
  'In which city is the company that Zorbin Kell works for headquartered?',
  'What is the name of the pet of Zorbin Kell?',
  'Who founded Traibu Energy?',
];

// Requests of every kind: chat with documents (asking redknot mode), plain completions, n = 2.
const REQUESTS = [
  ...QUESTIONS.map((q, i) => ({
    path: 'chat/completions',
    body: {documents: i === 2 ? DOCS.slice(1) : DOCS, reuse_mode: 'redknot', max_tokens: 12 + 4 * i,
           messages: [{role: 'user', content: q}]},
  })),
  ...['Zorbin Kell was born in', 'The headquarters of Traibu Energy are in'].map((p) => ({
    path: 'completions', body: {prompt: p, max_tokens: 16},
  })),
  {path: 'completions', body: {prompt: 'Velo Drask3 works for', max_tokens: 8, n: 2, seed: 5}},
  // Logprobs need the host logits: the forward that returns them, not the device argmax.
  {path: 'completions', body: {prompt: 'Zorbin Kell was born in', max_tokens: 10, logprobs: 2}},
];
const LOGPROBS = REQUESTS.length - 1;

async function ask(base, {path, body}) {
  const r = await fetch(`${base}/v1/${path}`, {
    method: 'POST',
    headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({model: 'redknot-rag-8k', temperature: 0, ...body}),
  });
  const text = await r.text();
  assert.equal(r.status, 200, text);
  const j = JSON.parse(text);
  return {
    texts: j.choices.map((c) => c.message?.content ?? c.text),
    fallback: j.usage.reuse?.fallback ?? null,
    tokens: j.choices.map((c) => c.logprobs?.tokens ?? null),
    logprobs: j.choices.map((c) => c.logprobs?.token_logprobs ?? null),
  };
}

// Greedy tokens equal; logprobs within 1e-3 (ranks sum in another order than one model does).
function assertSame(got, want, what) {
  const {logprobs: gl, ...g} = got;
  const {logprobs: wl, ...w} = want;
  assert.deepEqual(g, w, what);
  gl.forEach((lp, c) => lp?.forEach((v, t) => {
    assert.ok(Math.abs(v - wl[c][t]) <= 1e-3, `${what}: logprob ${t}: ${v} vs ${wl[c][t]}`);
  }));
}

async function metric(base, name) {
  const text = await (await fetch(`${base}/metrics`)).text();
  const m = new RegExp(`^${name} (\\S+)$`, 'm').exec(text);
  assert.ok(m, `no ${name} in /metrics`);
  return Number(m[1]);
}

describe('serve --tensor-parallel-size', {skip}, () => {
  const servers = {};
  const expected = [];
  before(async () => {
    assert.ok(existsSync(CLI), `no redknot binary at ${CLI}`);
    assert.ok(existsSync(join(MODEL, 'model.safetensors')), `no shipped model in ${MODEL}`);
    for (const n of [1, 2, 4]) servers[n] = await startServer(n);
    servers.tight = await startServer(2, TIGHT);
    for (const r of REQUESTS) expected.push(await ask(servers[1].base, r));
  });
  after(async () => {
    for (const s of Object.values(servers)) await stop(s.proc);
  });

  test('a documents request without a chunk store is served full and says so', () => {
    assert.equal(expected[0].fallback, 'reuse_disabled', JSON.stringify(expected[0]));
    for (const e of expected) for (const t of e.texts) assert.ok(t.length > 0);
    assert.equal(expected[LOGPROBS].logprobs[0].length, 10);
  });

  for (const n of [2, 4, 'tight']) {
    const tp = n === 'tight' ? 2 : n;
    test(`TP=${tp}${n === 'tight' ? ', tight pool' : ''}: greedy answers equal TP=1's, one at a ` +
             'time and all at once',
         async () => {
           const {base, log} = servers[n];
           assert.match(log(), new RegExp(`per rank, tensor parallel ${tp}`));
           if (n === 'tight') assert.match(log(), / 189 KV pages /);
           for (let i = 0; i < REQUESTS.length; ++i)
             assertSame(await ask(base, REQUESTS[i]), expected[i], `request ${i}`);
           // Twice every request at once: admission and steps over the ranks' caches under load.
           const all = [...REQUESTS, ...REQUESTS];
           const got = await Promise.all(all.map((r) => ask(base, r)));
           for (let i = 0; i < all.length; ++i)
             assertSame(got[i], expected[i % REQUESTS.length], `concurrent request ${i}`);
           assert.equal((await fetch(`${base}/health`)).status, 200);
           assert.equal(await metric(base, 'redknot_requests_failed_total'), 0);
           // Free pages are the fullest rank's: every rank gave its pages back.
           await waitFor(async () => (await metric(base, 'redknot_running_requests')) === 0,
                         'no running requests');
           assert.equal(await metric(base, 'redknot_kv_pool_pages_free'),
                        await metric(base, 'redknot_kv_pool_pages_total'));
         });
  }
});

describe('serve --tensor-parallel-size refusals', {skip}, () => {
  const serve = (args) => {
    const r = spawnSync(CLI, ['serve', '--model', MODEL, '--port', '0', ...args],
                        {encoding: 'utf8', timeout: 60000});
    assert.ok(!r.error, `${CLI}: ${r.error}`);
    return {status: r.status, out: r.stdout + r.stderr};
  };
  test('the chunk store, CUDA without NCCL and heads that do not split fail with the reason', () => {
    const store = serve(['--tensor-parallel-size', '2']);  // default --reuse-mode redknot
    assert.notEqual(store.status, 0);
    assert.match(store.out, /needs --reuse-mode off/);
    const cuda = serve(['--backend', 'cuda', '--tensor-parallel-size', '2', '--reuse-mode', 'off']);
    assert.notEqual(cuda.status, 0);
    assert.match(cuda.out, /NCCL/);
    const three = serve(['--tensor-parallel-size', '3', '--reuse-mode', 'off']);
    assert.notEqual(three.status, 0);
    assert.match(three.out, /does not divide/);
  });
});
