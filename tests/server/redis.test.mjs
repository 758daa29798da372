// Two `redknot serve` processes sharing one redis-server (the chunk store's remote tier, issue
// #22), on the shipped model: documents prefilled by A are a remote hit on B (usage.reuse and
// /metrics), B's greedy answer equals its answer on a second request (a local hit); a prompt's KV
// exported by A (kv_export) is imported and decoded by B (kv_import) to A's answer; Redis killed
// mid-run degrades B to misses (counted) and B keeps serving; a bad URL fails at startup.
// Plain fetch, no npm packages. Env: REDKNOT_CLI. Skips when redis-server is not installed.
import assert from 'node:assert/strict';
import {execFileSync, spawn, spawnSync} from 'node:child_process';
import {existsSync, mkdtempSync, rmSync} from 'node:fs';
import {tmpdir} from 'node:os';
import {dirname, join} from 'node:path';
import {fileURLToPath} from 'node:url';
import {after, before, describe, test} from 'node:test';

import {startServer as startServerAt, stop, waitFor} from './serve_process.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const CLI = process.env.REDKNOT_CLI;
const MODEL = join(here, '..', '..', 'models', 'redknot-rag-8k');
const REDIS = ['/usr/bin/redis-server', '/usr/local/bin/redis-server'].find((p) => existsSync(p));
const skip = !CLI || !existsSync(CLI) ? 'redknot binary not found' :
    !REDIS                            ? 'redis-server is not installed (apt-get install redis-server)' :
                                        false;

function startRedis(dir) {
  const sock = join(dir, 'redis.sock');
  const proc = spawn(
      REDIS,
      ['--port', '0', '--unixsocket', sock, '--save', '', '--appendonly', 'no', '--dir', dir],
      {stdio: 'ignore'});
  return {proc, url: `unix://${sock}`, sock};
}

function startServer(extra) {
  return startServerAt(CLI, MODEL, extra);
}

async function metric(base, name) {
  const text = await (await fetch(`${base}/metrics`)).text();
  const m = new RegExp(`^${name} (\\S+)`, 'm').exec(text);
  assert.ok(m, `${name} missing from /metrics`);
  return Number(m[1]);
}

// The first document is long (~1K tokens) so that the model's local heads (window 256) keep only
// part of it: B fetches their sink and window blocks, the global heads whole.
const FILLER = Array.from({length: 14}, (_, i) =>
    `Person ${i} named Velo Drask${i} was born in Harn${i} in ${1950 + i}. Friends describe ` +
    `Drask${i} as calm and patient. In the free time, Drask${i} collects old maps. These days ` +
    `Velo Drask${i} works for Quell${i} Systems.`).join(' ');
const DOCS = [
  FILLER + ' Zorbin Kell was born in Quoshtrathia in 1961. Friends describe Kell as curious and kind. In his free time, Kell reads about the migration of birds. Zorbin Kell has a pet owl called Shamso. These days Zorbin Kell works for Traibu Energy.',
  'Annual report of Traibu Energy. The company employs about 650 people. Revenue of Traibu Energy rose by 3 percent in the third quarter. Traibu Energy was founded in 1939 by Drasker Poxdryt. Most of the profit of Traibu Energy comes from the Brasshoush, its best-selling product. The headquarters of Traibu Energy are in Vornheim.',
];

async function ask(base, documents, question, extra = {}, status = 200) {
  const r = await fetch(`${base}/v1/chat/completions`, {
    method: 'POST',
    headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({
      model: 'redknot-rag-8k', documents, max_tokens: 16, temperature: 0,
      messages: [{role: 'user', content: question}], ...extra,
    }),
  });
  assert.equal(r.status, status, await r.clone().text());
  const j = await r.json();
  if (status !== 200) return j;
  return {text: j.choices[0].message.content, reuse: j.usage.reuse};
}

describe('two servers sharing one Redis (--chunk-store-redis)', {skip}, () => {
  let dir, redis, a, b;
  before(async () => {
    dir = mkdtempSync(join(tmpdir(), 'rk-redis-e2e-'));
    redis = startRedis(dir);
    await waitFor(() => existsSync(redis.sock), 'redis-server socket');
    const flags = ['--chunk-store-redis', redis.url, '--reuse-mode', 'redknot'];
    a = await startServer(flags);
    b = await startServer(flags);
  });
  after(async () => {
    await stop(a?.proc);
    await stop(b?.proc);
    await stop(redis?.proc);
    if (dir) rmSync(dir, {recursive: true, force: true});
  });

  test('a document prefilled by A is a remote hit on B; B answers the same on a local hit', async () => {
    const q = 'In which city is the company that Zorbin Kell works for headquartered?';
    const ra = await ask(a.base, DOCS, q);
    assert.equal(ra.reuse.segments_prefilled, ra.reuse.segments);
    await waitFor(
        async () => (await metric(a.base, 'redknot_chunk_store_remote_writes_total')) >= 1,
        'A writing its segment to Redis');
    const b1 = await ask(b.base, DOCS, q);
    assert.equal(b1.reuse.segments_remote, 1, JSON.stringify(b1.reuse));
    assert.equal(b1.reuse.segments_prefilled, 0);
    assert.equal(await metric(b.base, 'redknot_chunk_store_hits_total\\{tier="remote"\\}'), 1);
    assert.equal(await metric(b.base, 'redknot_chunk_store_remote_partial_hits_total'), 1);
    assert.ok(await metric(b.base, 'redknot_chunk_store_remote_bytes_read_total') > 0);
    const b2 = await ask(b.base, DOCS, q);
    assert.equal(b2.reuse.segments_remote, 0);
    assert.equal(b2.reuse.segments_hit, 1);  // local pool hit now
    assert.equal(b2.text, b1.text);
    assert.equal(b1.text, ra.text);  // and A's answer (its S0 KV is the same bytes)
  });

  test('prefill/decode handover: A exports the prompt KV, B imports it and decodes', async () => {
    const q = 'Which product brings most of the profit of the company Zorbin Kell works for?';
    const docs = [DOCS[1], DOCS[0]];
    const ra = await ask(a.base, docs, q, {kv_export: 'req-42'});
    assert.equal(ra.reuse.kv_handover_error, null);
    assert.ok(ra.reuse.kv_export_bytes > 0);
    const rb = await ask(b.base, docs, q, {kv_import: 'req-42'});
    assert.equal(rb.reuse.kv_handover_error, null, JSON.stringify(rb.reuse));
    assert.equal(rb.reuse.kv_import_bytes, ra.reuse.kv_export_bytes);
    // Head-major: local heads (13 of 16) send only their sink + window of the ~1.2K-token prompt.
    assert.ok(rb.reuse.kv_import_bytes < 0.6 * rb.reuse.kv_token_major_bytes, JSON.stringify(rb.reuse));
    assert.equal(rb.text, ra.text);  // B decodes what A would have
    const m = await (await fetch(`${b.base}/metrics`)).text();
    assert.match(m, /^redknot_kv_handovers_total\{outcome="imported"\} 1$/m);
    // Another prompt under that handle, or a handle never exported: prefilled, and said so.
    const rc = await ask(b.base, docs, q + ' Please answer.', {kv_import: 'req-42'});
    assert.equal(rc.reuse.fallback, 'kv_import_failed');
    assert.match(rc.reuse.kv_handover_error, /another prompt/);
    const bad = await ask(b.base, docs, q, {kv_import: 'no spaces'}, 400);
    assert.match(bad.error.message, /kv_import must be/);
  });

  test('Redis gone: B keeps serving, misses counted as remote errors', async () => {
    await stop(redis.proc);
    // Documents no server has seen: B asks Redis, which is gone.
    const docs = ['Diary of Pell Ordo. Today Ordo walked to the harbour of Vask and bought bread.',
                  DOCS[1]];
    const r = await ask(b.base, docs, 'Who founded Traibu Energy?');
    assert.equal(r.reuse.segments_remote, 0);
    assert.ok(await metric(b.base, 'redknot_chunk_store_remote_errors_total') > 0);
    assert.ok((await fetch(`${b.base}/health`)).ok);
  });
});

describe('--chunk-store-redis validation', {skip: !CLI || !existsSync(CLI)}, () => {
  test('an invalid URL is a clear error at startup', () => {
    const r = spawnSync(CLI, ['serve', '--model', MODEL, '--chunk-store-redis', 'http://x:1'],
                        {encoding: 'utf8', timeout: 30000});
    assert.notEqual(r.status, 0);
    assert.match(r.stderr + r.stdout, /--chunk-store-redis 'http:\/\/x:1': expected redis:\/\/host:port/);
  });
});
