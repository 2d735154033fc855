// End-to-end test of the web demo's message features in a real browser
// (Debian's Chromium), issue #13 item 7, as people use them: alice edits
// and deletes a message of hers and bob's page shows the change; bob
// reacts and alice sees the count; alice sends an image and bob's page
// shows it; alice, offline, writes a message and reloads the page: the
// message survives in IndexedDB (the SDK's outbox, the browser's real
// one), is shown pending, and once online is delivered once.
//
//   node e2e/features.e2e.mjs --base http://127.0.0.1:8080 --jwt-secret S [--out DIR]
//
// The broker must trust HS256 JWTs signed with S (both log in with one:
// attachments go through the HTTP API, which takes JWTs) and serve dist/.

import { createHmac } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { deflateSync } from 'node:zlib';
import { args, assert, launch, steps } from './browser.mjs';

const { base, out = 'target/e2e-features', 'jwt-secret': jwtSecret } = args(['base', 'jwt-secret']);
const outDir = resolve(out);
mkdirSync(outDir, { recursive: true });
const DM = 'dm:alice:bob';
const T = 15_000;
const PHONE = { viewport: { width: 390, height: 780 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true };

function jwt(user) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
  const head = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ sub: user, exp: Math.floor(Date.now() / 1000) + 3600 })}`;
  return `${head}.${createHmac('sha256', jwtSecret).update(head).digest('base64url')}`;
}

const browser = await launch();
const aliceCtx = await browser.newContext(PHONE);
const bobCtx = await browser.newContext(PHONE);
const alice = await aliceCtx.newPage();
const bob = await bobCtx.newPage();
for (const [name, page] of [['alice', alice], ['bob', bob]]) {
  page.on('pageerror', (e) => console.log(`[${name} page error] ${e.message}`));
}

/** What the open conversation shows, top to bottom. */
function shown(page) {
  return page.$$eval('[data-testid="message-list"] [data-testid="message"]', (els) =>
    els.map((e) => ({
      seq: e.dataset.seq ? Number(e.dataset.seq) : null,
      id: e.dataset.id,
      from: e.dataset.from,
      state: e.dataset.state,
      edited: e.dataset.edited === 'true',
      deleted: e.dataset.deleted === 'true',
      text: e.querySelector('[data-testid="message-body"]').textContent,
      reactions: [...e.querySelectorAll('[data-testid="reaction"]')].map((r) => ({ emoji: r.dataset.emoji, count: Number(r.dataset.count), mine: r.dataset.mine === 'true' })),
      images: [...e.querySelectorAll('[data-testid="attachment-image"]')].map((i) => ({ loaded: i.complete && i.naturalWidth > 0, width: i.naturalWidth })),
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
  throw new Error(`${what}: gave up after ${timeout} ms; shown: ${JSON.stringify(last)}`);
}

async function waitAttr(page, selector, name, value) {
  await page.waitForFunction(([s, n, v]) => document.querySelector(s)?.getAttribute(n) === v, [selector, name, value], { timeout: T });
}

async function login(page, user) {
  await page.goto(base);
  await page.getByTestId('login-user').fill(user);
  await page.getByTestId('login-secret').fill(jwt(user));
  await page.getByTestId('login-submit').click();
  await page.waitForSelector('[data-testid="conn-status"][data-state="online"]', { timeout: T });
}

async function send(page, text) {
  await page.getByTestId('composer-input').fill(text);
  await page.getByTestId('composer-send').click();
}

/** The message of `page` whose text is `text`. */
const message = (page, text) => page.locator('[data-testid="message"]', { has: page.locator('[data-testid="message-body"]', { hasText: text }) });

/** How many messages the SDK's outbox holds in the page's IndexedDB. */
const outboxSize = (page) =>
  page.evaluate(
    () =>
      new Promise((res, rej) => {
        const req = indexedDB.open('chatmq-web');
        req.onerror = () => rej(req.error);
        req.onsuccess = () => {
          if (!req.result.objectStoreNames.contains('outbox')) return res(0);
          const tx = req.result.transaction('outbox', 'readonly');
          const count = tx.objectStore('outbox').count();
          count.onsuccess = () => { res(count.result); req.result.close(); };
        };
      }),
  );

/** A valid w x h PNG of one colour (so the browser decodes it). */
function png(w, h, [r, g, b]) {
  const crcTable = [...Array(256).keys()].map((n) => { let c = n; for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1; return c >>> 0; });
  const crc = (buf) => { let c = 0xffffffff; for (const x of buf) c = crcTable[(c ^ x) & 0xff] ^ (c >>> 8); return (c ^ 0xffffffff) >>> 0; };
  const chunk = (type, data) => {
    const len = Buffer.alloc(4); len.writeUInt32BE(data.length);
    const body = Buffer.concat([Buffer.from(type, 'ascii'), data]);
    const sum = Buffer.alloc(4); sum.writeUInt32BE(crc(body));
    return Buffer.concat([len, body, sum]);
  };
  const header = Buffer.alloc(13); header.writeUInt32BE(w, 0); header.writeUInt32BE(h, 4); header.set([8, 2, 0, 0, 0], 8);
  const row = Buffer.concat([Buffer.from([0]), Buffer.from(Array(w).fill([r, g, b]).flat())]);
  return Buffer.concat([Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]), chunk('IHDR', header), chunk('IDAT', deflateSync(Buffer.concat(Array(h).fill(row)))), chunk('IEND', Buffer.alloc(0))]);
}

await steps([
  ['alice and bob log in; alice writes to bob, bob opens the conversation', async () => {
    await login(alice, 'alice');
    await login(bob, 'bob');
    await alice.getByTestId('new-dm-user').fill('bob');
    await alice.getByTestId('new-dm-start').click();
    await send(alice, 'frist post');
    await until(alice, 'delivered', (l) => l.length === 1 && l[0].seq === 1 && l[0].state !== 'pending');
    await bob.locator(`[data-testid="conv-item"][data-conv="${DM}"]`).click();
    await until(bob, 'bob sees it', (l) => l.some((m) => m.text === 'frist post'));
  }],

  ['alice edits her message: bob\'s page shows the new text, marked edited', async () => {
    await message(alice, 'frist post').getByTestId('message-edit').click();
    assert(await alice.getByTestId('composer-input').inputValue() === 'frist post', 'the composer holds the text to edit');
    await send(alice, 'first post');
    const list = await until(bob, 'bob sees the edit', (l) => l.some((m) => m.seq === 1 && m.text === 'first post' && m.edited));
    assert(list.length === 1, `the edit is not a message of its own: ${JSON.stringify(list)}`);
    await until(alice, 'alice sees the edit', (l) => l.length === 1 && l[0].text === 'first post' && l[0].edited);
    assert((await bob.getByTestId('message-edit').count()) === 0, 'bob can edit alice\'s message');
  }],

  ['alice deletes a message: bob\'s page shows it deleted', async () => {
    await send(alice, 'oops, wrong chat');
    await until(bob, 'bob sees oops', (l) => l.some((m) => m.text === 'oops, wrong chat'));
    await message(alice, 'oops, wrong chat').getByTestId('message-delete').click();
    const list = await until(bob, 'bob sees the delete', (l) => l.some((m) => m.deleted && m.text === 'message deleted'));
    assert(!list.some((m) => m.text.includes('oops')), `the deleted text is still shown: ${JSON.stringify(list)}`);
    await until(alice, 'alice sees the delete', (l) => l.some((m) => m.deleted));
  }],

  ['bob reacts 👍 to the first post: alice sees the count', async () => {
    await message(bob, 'first post').getByTestId('message-react').click();
    await until(bob, 'bob sees his reaction', (l) => l.some((m) => m.seq === 1 && m.reactions.some((r) => r.emoji === '👍' && r.count === 1 && r.mine)));
    await until(alice, 'alice sees the count', (l) => l.some((m) => m.seq === 1 && m.reactions.some((r) => r.emoji === '👍' && r.count === 1 && !r.mine)));
    await message(alice, 'first post').getByTestId('message-react').click();
    await until(bob, 'bob sees the count of two', (l) => l.some((m) => m.seq === 1 && m.reactions.some((r) => r.emoji === '👍' && r.count === 2 && r.mine)));
  }],

  ['alice sends an image: bob\'s page shows it', async () => {
    await alice.getByTestId('composer-file').setInputFiles({ name: 'square.png', mimeType: 'image/png', buffer: png(24, 16, [15, 118, 110]) });
    await until(alice, 'alice sees her image delivered', (l) => l.some((m) => m.images.length === 1 && m.images[0].loaded && m.seq && m.state !== 'pending'));
    const list = await until(bob, 'bob sees the image', (l) => l.some((m) => m.images.length === 1 && m.images[0].loaded));
    assert(list.find((m) => m.images.length === 1).images[0].width === 24, 'the image as uploaded');
    await bob.screenshot({ path: join(outDir, 'bob-features.png') });
  }],

  ['alice, offline, writes a message and reloads: it waits in IndexedDB and is delivered once when online', async () => {
    await aliceCtx.setOffline(true);
    await waitAttr(alice, '[data-testid="conn-status"]', 'data-state', 'offline');
    await send(alice, 'pending across a reload');
    await until(alice, 'pending', (l) => l.some((m) => m.text === 'pending across a reload' && m.state === 'pending'));
    const deadline = Date.now() + T;
    while ((await outboxSize(alice)) !== 1) {
      assert(Date.now() < deadline, 'the message never reached IndexedDB');
      await alice.waitForTimeout(50);
    }
    await alice.reload();
    await waitAttr(alice, '[data-testid="conn-status"]', 'data-state', 'offline');
    await until(alice, 'the reloaded page shows it pending', (l) => l.some((m) => m.text === 'pending across a reload' && m.state === 'pending'));
    await aliceCtx.setOffline(false);
    await waitAttr(alice, '[data-testid="conn-status"]', 'data-state', 'online');
    await until(bob, 'bob gets it', (l) => l.some((m) => m.text === 'pending across a reload'));
    const mine = await until(alice, 'alice sees it delivered', (l) => l.some((m) => m.text === 'pending across a reload' && m.seq && m.state !== 'pending'));
    await alice.waitForTimeout(1000);
    const theirs = await shown(bob);
    assert(theirs.filter((m) => m.text === 'pending across a reload').length === 1, `bob shows it ${JSON.stringify(theirs)}`);
    const again = await shown(alice);
    assert(again.filter((m) => m.text === 'pending across a reload').length === 1, `alice shows it twice: ${JSON.stringify(again)}`);
    assert(mine.filter((m) => m.text === 'pending across a reload').length === 1, 'alice shows it once');
    assert((await outboxSize(alice)) === 0, 'the outbox is empty once delivered');
    const seqs = theirs.map((m) => m.seq);
    assert(seqs.every((s, i) => i === 0 || s > seqs[i - 1]), `bob's order: ${seqs}`);
    await alice.screenshot({ path: join(outDir, 'alice-features.png') });
    console.log(`screenshots: ${join(outDir, 'alice-features.png')} ${join(outDir, 'bob-features.png')}`);
  }],
], async () => {
  await browser.close();
});
