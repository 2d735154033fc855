// MQTT.js interoperability in a real browser: bundles MQTT.js's browser
// build with interop-page.js, loads it into headless Chromium and runs the
// checks against chatmq's WebSocket listener with MQTT 3.1.1 and 5.
//
//   node e2e/mqttjs.interop.mjs --base http://127.0.0.1:8080
//
// The page is opened on the broker's HTTP origin and asks
// /v1/client-config where WebSocket listens, as the web demo does (a page
// from another origin, about:blank included, may not reach a loopback
// address: Chromium's Local Network Access checks). The broker needs the static users alice/alice-demo and bob/bob-demo and
// an ACL rule letting users publish and subscribe under interop/#.

import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as esbuild from 'esbuild';
import { args, launch, steps } from './browser.mjs';

const { base } = args(['base']);
const here = dirname(fileURLToPath(import.meta.url));

const bundle = await esbuild.build({
  entryPoints: [join(here, 'interop-page.js')],
  bundle: true,
  format: 'iife',
  platform: 'browser',
  target: ['es2020'],
  write: false,
  logLevel: 'warning',
});

const browser = await launch();
const page = await browser.newPage();
page.on('pageerror', (e) => console.log(`[page error] ${e.message}`));
page.on('crash', () => console.log('[page crashed]'));
page.on('console', (m) => console.log(`[console] ${m.text()}`));
await page.goto(new URL('/healthz', base).href);
await page.addScriptTag({ content: bundle.outputFiles[0].text });
const ws = await page.evaluate(async () => {
  const { websocket } = await (await fetch('/v1/client-config')).json();
  return `ws://${location.hostname}:${websocket.port}${websocket.path}`;
});
const run = Date.now().toString(36);

await steps(
  [4, 5].map((protocolVersion) => [
    `MQTT.js ${protocolVersion === 5 ? '5.0' : '3.1.1'} in Chromium ${browser.version()}`,
    async () => {
      const results = await page.evaluate((o) => window.runInterop(o), { url: ws, protocolVersion, run });
      for (const r of results) console.log(`  ${r.ok ? 'ok  ' : 'FAIL'} ${r.name}${r.detail ? `: ${r.detail}` : ''}`);
      const failed = results.filter((r) => !r.ok);
      if (failed.length > 0) throw new Error(`${failed.length} check(s) failed`);
    },
  ]),
  () => browser.close(),
);
