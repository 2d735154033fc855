// End-to-end test of the web demo in a real browser (Debian's Chromium):
// two people on phone-sized screens log in by typing in the form, start a
// direct conversation and chat both ways; alice's browser goes offline
// while bob keeps writing, and when it comes back her page shows all of
// bob's messages, in order, exactly once. Also: pending -> delivered ->
// read states, presence and typing indicators, installability (manifest,
// icons, service worker), a third user loading history by scrolling up, a
// reload.
//
//   node e2e/chat.e2e.mjs --base http://127.0.0.1:8080 [--out DIR]
//
// The broker must have the static users alice, bob and carol with the
// passwords alice-demo, bob-demo and carol-demo (config/demo.toml) and serve dist/ at --base. Screenshots go to --out.

import { mkdirSync } from 'node:fs';
import { join, resolve } from 'node:path';
import mqtt from 'mqtt';
import { args, assert, launch, steps } from './browser.mjs';

const { base, out = 'target/e2e' } = args(['base']);
const outDir = resolve(out);
mkdirSync(outDir, { recursive: true });
const PASSWORD = (user) => `${user}-demo`;
const DM = 'dm:alice:bob';
const OFFLINE_BURST = 5;
const BULK = 75; // more than two history pages of 30
const T = 15_000;

const PHONE = { viewport: { width: 390, height: 780 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true };

const browser = await launch();
const aliceCtx = await browser.newContext(PHONE);
const bobCtx = await browser.newContext(PHONE);
const alice = await aliceCtx.newPage();
const bob = await bobCtx.newPage();
for (const [name, page] of [['alice', alice], ['bob', bob]]) {
  page.on('pageerror', (e) => console.log(`[${name} page error] ${e.message}`));
}
let groupConv = null;

/** What the open conversation shows, top to bottom. */
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

/** Waits until `check(shown messages)` is true; fails showing them. */
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

/** Seqs strictly increasing and each element once. */
function assertOrderedOnce(list, who) {
  const seqs = list.map((m) => m.seq);
  for (let i = 1; i < seqs.length; i++) {
    assert(seqs[i] > seqs[i - 1], `${who}: seqs not strictly increasing: ${seqs}`);
  }
  const keys = list.map((m) => `${m.from}/${m.id}`);
  assert(new Set(keys).size === keys.length, `${who}: a message is shown twice: ${keys}`);
}

async function login(page, user, protocol) {
  await page.goto(base);
  await page.getByTestId('login-user').fill(user);
  await page.getByTestId('login-secret').fill(PASSWORD(user));
  await page.locator('details summary', { hasText: 'Connection' }).click();
  await page.getByTestId('login-protocol').selectOption(protocol);
  await page.getByTestId('login-submit').click();
  await page.waitForSelector('[data-testid="conn-status"][data-state="online"]', { timeout: T });
}

async function send(page, text) {
  await page.getByTestId('composer-input').fill(text);
  await page.getByTestId('composer-send').click();
}

const attr = (page, selector, name) => page.locator(selector).getAttribute(name, { timeout: T });
const convItem = (conv) => `[data-testid="conv-item"][data-conv="${conv}"]`;

async function waitAttr(page, selector, name, value) {
  await page.waitForFunction(
    ([s, n, v]) => document.querySelector(s)?.getAttribute(n) === v,
    [selector, name, value],
    { timeout: T },
  );
}

await steps([
  ['the app is installable: manifest with PNG icons, service worker active', async () => {
    await alice.goto(base);
    const href = await alice.locator('link[rel="manifest"]').getAttribute('href');
    const manifest = await (await alice.request.get(new URL(href, base).href)).json();
    assert(manifest.display === 'standalone' && manifest.start_url, `manifest: ${JSON.stringify(manifest)}`);
    for (const size of ['192x192', '512x512']) {
      const icon = manifest.icons.find((i) => i.sizes === size && i.type === 'image/png');
      assert(icon, `no ${size} PNG icon in the manifest`);
      const r = await alice.request.get(new URL(icon.src, base).href);
      const bytes = await r.body();
      assert(r.ok() && bytes.subarray(1, 4).toString() === 'PNG', `${icon.src} is not a PNG`);
    }
    const active = await alice.evaluate(() => navigator.serviceWorker.ready.then((r) => Boolean(r.active)));
    assert(active, 'no active service worker');
  }],

  ['a wrong password is refused on the login form', async () => {
    await alice.getByTestId('login-user').fill('alice');
    await alice.getByTestId('login-secret').fill('not-the-password');
    await alice.getByTestId('login-submit').click();
    await alice.waitForFunction(() => document.querySelector('[data-testid="login-error"]').textContent.length > 0, null, { timeout: T });
  }],

  ['alice (MQTT 5) and bob (MQTT 3.1.1) log in', async () => {
    await login(alice, 'alice', '5');
    await login(bob, 'bob', '4');
  }],

  ['alice starts a conversation with bob; her message goes pending -> delivered', async () => {
    await alice.getByTestId('new-dm-user').fill('bob');
    await alice.getByTestId('new-dm-start').click();
    await alice.waitForFunction(() => document.querySelector('[data-testid="chat-title"]').textContent === 'bob', null, { timeout: T });
    await send(alice, 'hello bob');
    const list = await until(alice, 'alice sees her message delivered', (l) => l.length === 1 && l[0].seq === 1 && l[0].state !== 'pending');
    assert(list[0].text === 'hello bob', JSON.stringify(list));
  }],

  ['bob sees the conversation with 1 unread, alice online; opening it sends a read receipt', async () => {
    await waitAttr(bob, `${convItem(DM)} [data-testid="unread"]`, 'data-count', '1');
    await waitAttr(bob, `${convItem(DM)} [data-testid="presence"]`, 'data-status', 'online');
    await bob.locator(convItem(DM)).click();
    await until(bob, 'bob sees hello bob', (l) => l.some((m) => m.text === 'hello bob' && m.seq === 1));
    await waitAttr(bob, `${convItem(DM)} [data-testid="unread"]`, 'data-count', '0');
    await until(alice, 'alice sees her message read', (l) => l[0]?.state === 'read');
  }],

  ['bob types: alice sees "bob is typing"; his reply arrives and the indicator goes', async () => {
    await bob.getByTestId('composer-input').pressSequentially('hi al', { delay: 30 });
    await alice.waitForFunction(() => document.querySelector('[data-testid="typing"]').textContent.includes('bob is typing'), null, { timeout: T });
    await bob.getByTestId('composer-input').pressSequentially('ice');
    await bob.getByTestId('composer-input').press('Enter');
    await until(bob, 'bob sees his reply delivered', (l) => l.some((m) => m.text === 'hi alice' && m.seq === 2 && m.state !== 'pending'));
    await until(alice, 'alice gets the reply', (l) => l.some((m) => m.text === 'hi alice' && m.seq === 2));
    await alice.waitForFunction(() => document.querySelector('[data-testid="typing"]').textContent === '', null, { timeout: T });
    await waitAttr(alice, '[data-testid="chat-presence"]', 'data-status', 'online');
  }],

  [`alice goes offline; bob sends ${OFFLINE_BURST} messages; what alice writes meanwhile stays pending`, async () => {
    await aliceCtx.setOffline(true);
    await waitAttr(alice, '[data-testid="conn-status"]', 'data-state', 'offline');
    await waitAttr(bob, '[data-testid="chat-presence"]', 'data-status', 'offline');
    await send(alice, 'written while offline');
    for (let i = 1; i <= OFFLINE_BURST; i++) {
      await send(bob, `while you were away ${i}`);
    }
    await until(bob, 'bob sees his burst delivered', (l) => l.filter((m) => m.text.startsWith('while you were away') && m.seq && m.state !== 'pending').length === OFFLINE_BURST);
    await alice.waitForTimeout(1000);
    const list = await shown(alice);
    const mine = list.find((m) => m.text === 'written while offline');
    assert(mine && mine.state === 'pending' && mine.seq === null, `alice's offline message should be pending: ${JSON.stringify(mine)}`);
    assert(!list.some((m) => m.text.startsWith('while you were away')), 'alice got messages while offline');
  }],

  ['alice comes back: every message once, in order; hers is delivered', async () => {
    await aliceCtx.setOffline(false);
    await waitAttr(alice, '[data-testid="conn-status"]', 'data-state', 'online');
    const total = 2 + OFFLINE_BURST + 1;
    const list = await until(alice, 'alice catches up', (l) => l.length >= total && l.every((m) => m.seq && m.state !== 'pending'));
    assertOrderedOnce(list, 'alice');
    assert(list.length === total, `alice shows ${list.length} messages, expected ${total}`);
    assert(JSON.stringify(list.map((m) => m.seq)) === JSON.stringify([...Array(total).keys()].map((i) => i + 1)), `seqs ${list.map((m) => m.seq)}`);
    const burst = list.filter((m) => m.from === 'bob' && m.text.startsWith('while you were away')).map((m) => m.text);
    const expected = [...Array(OFFLINE_BURST).keys()].map((i) => `while you were away ${i + 1}`);
    assert(JSON.stringify(burst) === JSON.stringify(expected), `burst as shown: ${burst}`);
    await until(bob, 'bob gets the message alice wrote offline', (l) => l.filter((m) => m.text === 'written while offline').length === 1);
    await waitAttr(bob, '[data-testid="chat-presence"]', 'data-status', 'online');
    await alice.screenshot({ path: join(outDir, 'alice-after-offline.png') });
    await bob.screenshot({ path: join(outDir, 'bob.png') });
  }],

  [`carol, new here, opens a group of ${BULK} messages: history loads as she scrolls up`, async () => {
    const config = await (await fetch(new URL('/v1/client-config', base))).json();
    const url = `ws://${new URL(base).hostname}:${config.websocket.port}${config.websocket.path}`;
    groupConv = await fillGroup(url);
    const carol = await (await browser.newContext(PHONE)).newPage();
    await login(carol, 'carol', '5');
    await waitAttr(carol, `${convItem(groupConv)} [data-testid="unread"]`, 'data-count', String(BULK));
    assert(await carol.locator(`${convItem(groupConv)} [data-testid="conv-name"]`).textContent() === 'Big group', 'group title');
    await carol.locator(convItem(groupConv)).click();
    let list = await until(carol, 'the newest page shows', (l) => l.length > 0 && l.at(-1).text === `bulk ${BULK}`);
    assert(list.length < BULK, `the whole history was loaded at once (${list.length})`);
    const box = carol.getByTestId('messages');
    for (let i = 0; i < 20; i++) {
      const state = await attr(carol, '[data-testid="history-status"]', 'data-state');
      if (state === 'start' && (await shown(carol)).length === BULK) break;
      await box.evaluate((el) => { el.scrollTop = 0; });
      await carol.waitForTimeout(300);
    }
    list = await until(carol, 'all history after scrolling', (l) => l.length === BULK);
    assertOrderedOnce(list, 'carol');
    const texts = list.map((m) => m.text);
    assert(texts.every((t, i) => t === `bulk ${i + 1}`), `history out of order: ${texts}`);
    assert(await attr(carol, '[data-testid="history-status"]', 'data-state') === 'start', 'no start-of-conversation marker');
    await waitAttr(carol, `${convItem(groupConv)} [data-testid="unread"]`, 'data-count', '0');
    await carol.screenshot({ path: join(outDir, 'carol-history.png') });
  }],

  ['a reload keeps alice signed in and shows the conversation once', async () => {
    await alice.goto(`${base}#/c/${encodeURIComponent(DM)}`);
    await alice.reload();
    await waitAttr(alice, '[data-testid="conn-status"]', 'data-state', 'online');
    const list = await until(alice, 'the conversation after a reload', (l) => l.length === 2 + OFFLINE_BURST + 1);
    assertOrderedOnce(list, 'alice (reloaded)');
    await alice.screenshot({ path: join(outDir, 'alice.png') });
    console.log(`screenshots: ${join(outDir, 'alice.png')} ${join(outDir, 'alice-after-offline.png')} ${join(outDir, 'carol-history.png')} ${join(outDir, 'bob.png')}`);
  }],
], async () => {
  await browser.close();
});

/** Bob, from a script (MQTT.js in Node), creates a group with alice and
 *  carol and writes BULK messages to it. */
async function fillGroup(url) {
  const client = await mqtt.connectAsync(url, { username: 'bob', password: PASSWORD('bob'), clientId: 'e2e-bob-script', protocolVersion: 5 });
  try {
    const replies = new Map();
    client.on('message', (topic, payload) => {
      const v = JSON.parse(payload.toString());
      if (v.type === 'rpc') replies.get(v.id)?.(v);
    });
    await client.subscribeAsync('users/bob/events', { qos: 1 });
    const reply = new Promise((res) => replies.set('create', res));
    await client.publishAsync('rpc/conversation.create', JSON.stringify({ id: 'create', title: 'Big group', members: ['alice', 'carol'] }), { qos: 1 });
    const created = await reply;
    assert(created.ok, `conversation.create: ${JSON.stringify(created)}`);
    for (let i = 1; i <= BULK; i++) {
      await client.publishAsync(`chat/${created.result.conv}`, JSON.stringify({ id: `bulk-${i}`, body: { text: `bulk ${i}` } }), { qos: 1 });
    }
    return created.result.conv;
  } finally {
    await client.endAsync();
  }
}
