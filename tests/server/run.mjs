// CTest entry of the server suite: installs the npm test client when missing (npm ci from the
// committed lock file), then runs server.test.mjs with node:test. Exit code 77 = skipped.
import {spawnSync} from 'node:child_process';
import {existsSync} from 'node:fs';
import {dirname, join} from 'node:path';
import {fileURLToPath} from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const skip = (why) => {
  console.log(`SKIP: ${why}`);
  process.exit(77);
};

if (!process.env.REDKNOT_CLI || !existsSync(process.env.REDKNOT_CLI))
  skip(`redknot binary not found (REDKNOT_CLI=${process.env.REDKNOT_CLI})`);
if (!existsSync(join(here, 'node_modules', 'openai'))) {
  const npm = spawnSync('npm', ['--version'], {encoding: 'utf8'});
  if (npm.status !== 0) skip('npm is not available to install the openai client');
  const ci =
      spawnSync('npm', ['ci', '--no-audit', '--no-fund', '--prefix', here], {stdio: 'inherit'});
  if (ci.status !== 0) {
    console.error('npm ci failed: cannot install the openai test client');
    process.exit(1);
  }
}
const r = spawnSync(
    process.execPath, ['--test', '--test-concurrency=1', join(here, 'server.test.mjs')],
    {stdio: 'inherit', env: process.env});
process.exit(r.status ?? 1);
