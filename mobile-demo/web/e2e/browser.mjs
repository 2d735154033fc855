// Shared by the browser scripts: Debian's Chromium through playwright-core,
// and a tiny command-line parser. `npx playwright install` cannot run here
// (no downloads but the package registries), so the system browser is used.

import { chromium } from 'playwright-core';

export const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';

export function launch() {
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    // Without the background-networking flags Chromium keeps trying to
    // reach Google's services, which are refused here, and stalls.
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
}

/** `--name value` pairs from the command line. */
export function args(required) {
  const out = {};
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith('--')) throw new Error(`unexpected argument ${argv[i]}`);
    out[argv[i].slice(2)] = argv[i + 1];
  }
  for (const name of required) {
    if (!out[name]) {
      console.error(`usage: node ${process.argv[1]} ${required.map((r) => `--${r} ...`).join(' ')}`);
      process.exit(2);
    }
  }
  return out;
}

/** Runs named steps, printing each; the first failure ends the run with
 *  exit status 1 after `cleanup`. */
export async function steps(list, cleanup) {
  let failed = false;
  for (const [name, fn] of list) {
    const t0 = Date.now();
    try {
      await fn();
      console.log(`ok   ${name} (${Date.now() - t0} ms)`);
    } catch (e) {
      console.log(`FAIL ${name}: ${e.stack || e}`);
      failed = true;
      break;
    }
  }
  await cleanup(failed);
  process.exit(failed ? 1 : 0);
}

export function assert(cond, message) {
  if (!cond) throw new Error(message);
}
