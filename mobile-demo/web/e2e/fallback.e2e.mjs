// End-to-end test of the HTTP fallback in a real browser (Debian's
// Chromium): alice's network blocks WebSocket (every WebSocket her page
// opens is closed by route interception), so her page falls back by
// itself to server-sent events (GET /v1/stream) and the HTTP API. She
// chats with bob, who is on MQTT over WebSocket; she goes offline while
// bob writes, and when she is back her page shows every message once, in
// order, and what she wrote offline is delivered.
//
//   node e2e/fallback.e2e.mjs --base http://127.0.0.1:8080 --jwt-secret S [--out DIR]
//
// The broker must have the static user bob (password bob-demo), trust
// HS256 JWTs signed with S (alice logs in with one: the HTTP API takes
// JWTs, not passwords) and serve dist/ at --base.

import { createHmac } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { args, assert, launch, steps } from './browser.mjs';

const { base, out = 'target/e2e-fallback', 'jwt-secret': jwtSecret } = args(['base', 'jwt-secret']);
const outDir = resolve(out);
mkdirSync(outDir, { recursive: true });
const DM = 'dm:alice:bob';
const OFFLINE_BURST = 5;
const T = 15_000;
const PHONE = { viewport: { width: 390, height: 780 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true };

/** An HS256 JWT for `user`, valid for an hour. */
function jwt(user) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
  const head = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ sub: user, exp: Math.floor(Date.now() / 1000) + 3600 })}`;
  return `${head}.${createHmac('sha256', jwtSecret).update(head).digest('base64url')}`;
}

const browser = await launch();
const aliceCtx = await browser.newContext(PHONE);
const bobCtx = await browser.newContext(PHONE);
let blocked = 0;
// The blocking network: any WebSocket alice's page opens is closed at once.
await aliceCtx.routeWebSocket(/.*/, (ws) => {
  blocked++;
  ws.close();
});
const alice = await aliceCtx.newPage();
const bob = await bobCtx.newPage();
for (const [name, page] of [['alice', alice], ['bob', bob]]) {
  page.on('pageerror', (e) => console.log(`[${name} page error] ${e.message}`));
}

function shown(page) {
  return page.$$eval('[data-testid="message-list"] [data-testid="message"]', (els) =>
    els.map((e) => ({
      seq: e.dataset.seq ? Number(e.dataset.seq) : null,
      id: e.dataset.id,
      from: e.dataset.from,
      state: e.dataset.state,
      text: e.querySelector('[data-testid="message-body"]').textContent,
    })),
  );
}

async function until(page, what, check, timeout = T) {
  const deadline = Date.now() + timeout;
  let last = [];
  while (Date.now() < deadline) {
    last = await shown(page);
    if (check(last)) return last;
    await page.waitForTimeout(100);
  }
  throw new Error(`${what}: gave up after ${timeout} ms; shown: ${JSON.stringify(last.map((m) => [m.seq, m.from, m.text, m.state]))}`);
}

async function waitAttr(page, selector, name, value) {
  await page.waitForFunction(
    ([s, n, v]) => document.querySelector(s)?.getAttribute(n) === v,
    [selector, name, value],
    { timeout: T },
  );
}

async function login(page, user, secret) {
  await page.goto(base);
  await page.getByTestId('login-user').fill(user);
  await page.getByTestId('login-secret').fill(secret);
  await page.getByTestId('login-submit').click();
  await page.waitForSelector('[data-testid="conn-status"][data-state="online"]', { timeout: T });
}

async function send(page, text) {
  await page.getByTestId('composer-input').fill(text);
  await page.getByTestId('composer-send').click();
}

const transport = (page) => page.evaluate(() => document.body.dataset.transport);

await steps([
  ['alice, with WebSocket blocked, logs in and her page falls back to the event stream', async () => {
    await login(alice, 'alice', jwt('alice'));
    assert(blocked > 0, 'the page never tried WebSocket');
    assert(await transport(alice) === 'stream', `alice's transport: ${await transport(alice)}`);
  }],

  ['bob logs in over WebSocket', async () => {
    await login(bob, 'bob', 'bob-demo');
    assert(await transport(bob) === 'websocket', `bob's transport: ${await transport(bob)}`);
  }],

  ['alice starts a conversation with bob; her message goes pending -> delivered', async () => {
    await alice.getByTestId('new-dm-user').fill('bob');
    await alice.getByTestId('new-dm-start').click();
    await alice.waitForFunction(() => document.querySelector('[data-testid="chat-title"]').textContent === 'bob', null, { timeout: T });
    await send(alice, 'hello over the fallback');
    await until(alice, 'alice sees her message delivered', (l) => l.length === 1 && l[0].seq === 1 && l[0].state !== 'pending');
  }],

  ['bob gets it and replies; alice sees him typing, then the reply, live', async () => {
    await bob.locator(`[data-testid="conv-item"][data-conv="${DM}"]`).click();
    await until(bob, 'bob sees the message', (l) => l.some((m) => m.text === 'hello over the fallback' && m.seq === 1));
    await bob.getByTestId('composer-input').pressSequentially('got it al', { delay: 30 });
    await alice.waitForFunction(() => document.querySelector('[data-testid="typing"]').textContent.includes('bob is typing'), null, { timeout: T });
    await bob.getByTestId('composer-input').pressSequentially('ice');
    await bob.getByTestId('composer-input').press('Enter');
    await until(alice, 'alice gets the reply', (l) => l.some((m) => m.text === 'got it alice' && m.seq === 2));
    await waitAttr(bob, '[data-testid="chat-presence"]', 'data-status', 'online');
  }],

  [`alice goes offline; bob sends ${OFFLINE_BURST} messages; hers stays pending`, async () => {
    await aliceCtx.setOffline(true);
    await waitAttr(alice, '[data-testid="conn-status"]', 'data-state', 'offline');
    await waitAttr(bob, '[data-testid="chat-presence"]', 'data-status', 'offline');
    await send(alice, 'written while offline');
    for (let i = 1; i <= OFFLINE_BURST; i++) await send(bob, `while you were away ${i}`);
    await until(bob, 'bob sees his burst delivered', (l) => l.filter((m) => m.text.startsWith('while you were away') && m.seq && m.state !== 'pending').length === OFFLINE_BURST);
    await alice.waitForTimeout(1000);
    const list = await shown(alice);
    assert(!list.some((m) => m.text.startsWith('while you were away')), 'alice got messages while offline');
    const mine = list.find((m) => m.text === 'written while offline');
    assert(mine && mine.state === 'pending', `alice's offline message should be pending: ${JSON.stringify(mine)}`);
  }],

  ['alice comes back over the fallback: every message once, in order; hers is delivered', async () => {
    await aliceCtx.setOffline(false);
    await waitAttr(alice, '[data-testid="conn-status"]', 'data-state', 'online');
    assert(await transport(alice) === 'stream', 'alice is still on the fallback');
    const total = 2 + OFFLINE_BURST + 1;
    const list = await until(alice, 'alice catches up', (l) => l.length >= total && l.every((m) => m.seq && m.state !== 'pending'));
    assert(list.length === total, `alice shows ${list.length} messages, expected ${total}: ${JSON.stringify(list)}`);
    const seqs = list.map((m) => m.seq);
    assert(JSON.stringify(seqs) === JSON.stringify([...Array(total).keys()].map((i) => i + 1)), `seqs ${seqs}`);
    const keys = list.map((m) => `${m.from}/${m.id}`);
    assert(new Set(keys).size === keys.length, `a message is shown twice: ${keys}`);
    const burst = list.filter((m) => m.from === 'bob' && m.text.startsWith('while you were away')).map((m) => m.text);
    const expected = [...Array(OFFLINE_BURST).keys()].map((i) => `while you were away ${i + 1}`);
    assert(JSON.stringify(burst) === JSON.stringify(expected), `burst as shown: ${burst}`);
    await until(bob, 'bob gets what alice wrote offline, once', (l) => l.filter((m) => m.text === 'written while offline').length === 1);
    await waitAttr(bob, '[data-testid="chat-presence"]', 'data-status', 'online');
    await alice.screenshot({ path: join(outDir, 'alice-fallback.png') });
    console.log(`screenshot: ${join(outDir, 'alice-fallback.png')}`);
  }],
], async () => {
  await browser.close();
});
