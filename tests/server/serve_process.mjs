// `redknot serve` as a child process for the node end-to-end tests: start on a free port (the
// server prints the port it bound), wait for /health, stop. Plain node, no npm packages.
import assert from 'node:assert/strict';
import {spawn} from 'node:child_process';

// Polls `fn` every 50 ms until it returns true; fails the test after `ms`.
export async function waitFor(fn, what, ms = 20000) {
  for (let t = 0; t < ms; t += 50) {
    if (await fn()) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  assert.fail(`timed out waiting for ${what}`);
}

// `cli serve --model model --port 0 ...args`; resolves once /health answers, with the process,
// its port and base URL, and its output so far (stdout and stderr).
export async function startServer(cli, model, args = [], startMs = 60000) {
  const proc = spawn(cli, ['serve', '--model', model, '--port', '0', ...args],
                     {stdio: ['ignore', 'pipe', 'pipe']});
  let log = '';
  const port = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`server did not start:\n${log}`)), startMs);
    const onData = (d) => {
      log += d;
      const m = /listening on http:\/\/[^:]+:(\d+)/.exec(log);
      if (m) {
        clearTimeout(timer);
        resolve(Number(m[1]));
      }
    };
    proc.stdout.on('data', onData);
    proc.stderr.on('data', onData);
    proc.on('exit', (code) => reject(new Error(`server exited (${code}):\n${log}`)));
  });
  const base = `http://127.0.0.1:${port}`;
  await waitFor(async () => {
    try {
      return (await fetch(`${base}/health`)).ok;
    } catch {
      return false;
    }
  }, '/health', startMs);
  return {proc, port, base, log: () => log};
}

// Kills the server (SIGKILL) and waits for it to exit; nothing when it already has.
export async function stop(proc) {
  if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
  const exited = new Promise((r) => proc.on('exit', r));
  proc.kill('SIGKILL');
  await exited;
}
