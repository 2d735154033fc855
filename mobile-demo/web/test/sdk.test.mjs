// The SDK (src/sdk) against the real chatmq binary, as apps use it: node's
// test runner, MQTT.js over WebSocket, the HTTP API, and fake-indexeddb
// standing in for the browser's IndexedDB (the same outbox code runs; the
// real IndexedDB is exercised in Chromium by e2e/features.e2e.mjs).
//
// Started by tests/tests/sdk_js.rs, which runs the broker (free ports, a
// temporary directory) and gives:
//   CHATMQ_WS_URL      ws://127.0.0.1:PORT/mqtt
//   CHATMQ_HTTP        http://127.0.0.1:PORT
//   CHATMQ_JWT_SECRET  the HS256 secret of [auth] jwt_secret
//   CHATMQ_CONTROL     a directory: writing restart.req there asks the
//                      Rust test to restart the broker (same data, same
//                      ports); it answers with restart.done.
//
//   node --test test/sdk.test.mjs

import { createHmac } from 'node:crypto';
import { existsSync, unlinkSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import assert from 'node:assert/strict';
import { after, describe, test } from 'node:test';
import { IDBFactory } from 'fake-indexeddb';
import { ChatClient, directConv, IndexedDbOutboxStore } from '../src/sdk/index.js';

const WS = process.env.CHATMQ_WS_URL;
const HTTP = process.env.CHATMQ_HTTP;
const SECRET = process.env.CHATMQ_JWT_SECRET;
const CONTROL = process.env.CHATMQ_CONTROL;
if (!WS || !HTTP || !SECRET || !CONTROL) throw new Error('run through tests/tests/sdk_js.rs (it sets CHATMQ_WS_URL, CHATMQ_HTTP, CHATMQ_JWT_SECRET, CHATMQ_CONTROL)');
const T = 15_000;
const DM = directConv('alice', 'bob');

/** An HS256 JWT for `user`, valid for an hour. */
function jwt(user) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
  const head = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ sub: user, exp: Math.floor(Date.now() / 1000) + 3600 })}`;
  return `${head}.${createHmac('sha256', SECRET).update(head).digest('base64url')}`;
}


/** Just enough of the browser's EventSource for the SDK's fallback link,
 *  over fetch (Node 20 has none): open, named events, error, close. The
 *  SDK reconnects by itself, so this one never does. */
class FetchEventSource {
  constructor(url) {
    this.ctl = new AbortController();
    this.listeners = new Map();
    this.onopen = null;
    this.onerror = null;
    this.run(url).catch(() => {
      if (!this.ctl.signal.aborted) this.onerror?.(new Event('error'));
    });
  }

  addEventListener(type, fn) {
    this.listeners.set(type, [...(this.listeners.get(type) ?? []), fn]);
  }

  close() {
    this.ctl.abort();
  }

  async run(url) {
    const r = await fetch(url, { headers: { accept: 'text/event-stream' }, signal: this.ctl.signal });
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    this.onopen?.(new Event('open'));
    const decoder = new TextDecoder();
    let buffer = '';
    let event = { type: 'message', data: [], id: '' };
    for await (const chunk of r.body) {
      buffer += decoder.decode(chunk, { stream: true });
      let nl;
      while ((nl = buffer.indexOf('\n')) >= 0) {
        const line = buffer.slice(0, nl).replace(/\r$/, '');
        buffer = buffer.slice(nl + 1);
        if (line === '') {
          if (event.data.length > 0) {
            const e = { type: event.type, data: event.data.join('\n'), lastEventId: event.id };
            for (const fn of this.listeners.get(event.type) ?? []) fn(e);
          }
          event = { type: 'message', data: [], id: event.id };
        } else if (!line.startsWith(':')) {
          const colon = line.indexOf(':');
          const field = colon < 0 ? line : line.slice(0, colon);
          const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
          if (field === 'event') event.type = value;
          else if (field === 'data') event.data.push(value);
          else if (field === 'id') event.id = value;
        }
      }
    }
    throw new Error('stream ended');
  }
}

const running = new Set();
after(() => {
  for (const c of running) c.stop();
});

/** A client of `user` that records what it emits. */
function client(user, extra = {}) {
  const c = new ChatClient({
    url: WS,
    httpBase: HTTP,
    user,
    secret: jwt(user),
    clientId: `sdk-test-${user}`,
    storage: false,
    backoff: { baseMs: 100, capMs: 1000 },
    ...extra,
  });
  c.got = [];
  c.acks = [];
  c.events = { edit: [], delete: [], reactions: [], connected: [], presence: [] };
  c.on('message', (m) => c.got.push(m));
  c.on('acked', (a) => c.acks.push(a));
  for (const k of Object.keys(c.events)) c.on(k, (e) => c.events[k].push(e));
  running.add(c);
  return c;
}

async function until(what, check, timeout = T) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const v = check();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`gave up waiting: ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

const online = (c) => until(`${c.user} online`, () => c.state === 'online');
const texts = (c, conv) => c.got.filter((m) => m.conv === conv && m.type === 'text').map((m) => m.body.text);

/** Each (conv, seq) once and strictly increasing per conversation. */
function assertOnceInOrder(c) {
  const last = new Map();
  for (const m of c.got) {
    const prev = last.get(m.conv) ?? 0;
    assert.ok(m.seq > prev, `${c.user}: ${m.conv} seq ${m.seq} after ${prev} (a duplicate or out of order)`);
    last.set(m.conv, m.seq);
  }
}

/** A local port that was free a moment ago (and is closed now). */
function freedPort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

async function restartBroker() {
  const done = join(CONTROL, 'restart.done');
  writeFileSync(join(CONTROL, 'restart.req'), '');
  await until('the broker restarted', () => existsSync(done), 60_000);
  unlinkSync(done);
}

describe('chatmq SDK against the real broker', { concurrency: false }, () => {
  let alice;
  let bob;

  test('alice and bob connect, send and receive with seqs, in order', async () => {
    alice = client('alice');
    bob = client('bob');
    await Promise.all([alice.start(), bob.start()]);
    await Promise.all([online(alice), online(bob)]);
    assert.equal(alice.events.connected[0].sessionPresent, false, 'a first connection has no session');
    assert.equal(alice.stats.subscribes, 1, 'one SUBSCRIBE for the chat session');
    for (const text of ['one', 'two', 'three']) await alice.send(DM, { text });
    await until('bob gets three', () => texts(bob, DM).length === 3);
    assert.deepEqual(bob.got.map((m) => [m.seq, m.from, m.body.text]), [[1, 'alice', 'one'], [2, 'alice', 'two'], [3, 'alice', 'three']]);
    await until('alice acked three', () => alice.acks.length === 3);
    assert.ok(alice.acks.every((a) => a.error === null));
    assert.equal(alice.pending().length, 0);
    assert.equal(alice.lastSeq(DM), 3, 'alice gets her own messages back with their seqs');
  });

  test('alice reconnects with her session present: no SUBSCRIBE, no history; what she missed comes once', async () => {
    alice.goOffline();
    assert.equal(alice.state, 'offline');
    for (let i = 1; i <= 4; i++) await bob.send(DM, { text: `missed ${i}` });
    await until('bob acked', () => bob.acks.length === 4);
    const subscribes = alice.stats.subscribes;
    const fills = alice.stats.fills;
    alice.connectNow();
    await online(alice);
    assert.equal(alice.events.connected.at(-1).sessionPresent, true, 'CONNACK session present');
    await until('alice gets what she missed', () => texts(alice, DM).filter((t) => t.startsWith('missed')).length === 4);
    assert.equal(alice.stats.subscribes, subscribes, 'a present session is not subscribed again');
    assert.equal(alice.stats.fills, fills, 'nothing was fetched from history');
    assert.deepEqual(texts(alice, DM), ['one', 'two', 'three', 'missed 1', 'missed 2', 'missed 3', 'missed 4']);
    assertOnceInOrder(alice);
  });

  test('a message written while offline is delivered once after reconnecting', async () => {
    alice.goOffline();
    const id = await alice.send(DM, { text: 'written offline' });
    assert.deepEqual(alice.pending(DM).map((p) => p.envelope.id), [id]);
    await new Promise((r) => setTimeout(r, 300));
    assert.ok(!texts(bob, DM).includes('written offline'), 'sent while offline');
    alice.connectNow();
    await until('bob gets it', () => texts(bob, DM).includes('written offline'));
    await until('alice acked it', () => alice.acks.some((a) => a.id === id && a.error === null));
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(texts(bob, DM).filter((t) => t === 'written offline').length, 1);
    assert.equal(alice.pending().length, 0);
    assertOnceInOrder(bob);
  });

  test('the broker restarts: both reconnect by themselves; every message once, in order', async () => {
    const before = bob.got.length;
    const connects = alice.stats.connects;
    await restartBroker();
    // bob writes while the broker may still be coming back: his outbox holds them.
    for (let i = 1; i <= 5; i++) await bob.send(DM, { text: `after restart ${i}` });
    await until('alice reconnected', () => alice.stats.connects > connects && alice.state === 'online', 30_000);
    await until('alice gets the five', () => texts(alice, DM).filter((t) => t.startsWith('after restart')).length >= 5, 30_000);
    await new Promise((r) => setTimeout(r, 500));
    assert.deepEqual(texts(alice, DM).filter((t) => t.startsWith('after restart')), [1, 2, 3, 4, 5].map((i) => `after restart ${i}`));
    assertOnceInOrder(alice);
    assertOnceInOrder(bob);
    assert.equal(bob.got.length - before, 5, 'bob gets his five back once');
    assert.equal(alice.events.connected.at(-1).sessionPresent, true, 'the session survived the restart');
    assert.equal(alice.stats.subscribes, 1, 'no SUBSCRIBE after the restart either');
  });

  test('a new session after a gap fills it from history: replay and history overlap, each seq once', async () => {
    // alice's session misses 3; a new client on it (a reload) was told it
    // holds up to an earlier seq, so the replay starts past a hole.
    const held = alice.lastSeq(DM);
    alice.stop();
    running.delete(alice);
    for (let i = 1; i <= 3; i++) await bob.send(DM, { text: `gap ${i}` });
    await until('bob acked', () => bob.acks.length >= 12);
    const again = client('alice');
    again.resumeFrom(DM, held - 2);
    await again.start();
    await until('the hole and the replay', () => again.lastSeq(DM) === held + 3);
    await new Promise((r) => setTimeout(r, 300));
    assert.deepEqual(again.got.map((m) => m.seq), [held - 1, held, held + 1, held + 2, held + 3]);
    assert.ok(again.stats.fills >= 1, 'the hole was filled from history');
    alice = again;
  });

  test('a fresh session (new client id) subscribes once and fills from the last seq', async () => {
    const fresh = client('alice', { clientId: 'sdk-test-alice-fresh' });
    fresh.resumeFrom(DM, 3);
    await fresh.start();
    await online(fresh);
    assert.equal(fresh.events.connected[0].sessionPresent, false);
    const head = bob.lastSeq(DM);
    await until('filled to the head', () => fresh.lastSeq(DM) === head);
    assert.equal(fresh.got[0].seq, 4);
    assert.equal(fresh.got.length, head - 3);
    assertOnceInOrder(fresh);
    assert.equal(fresh.stats.subscribes, 1);
    fresh.stop();
  });

  test('a reload resends the IndexedDB outbox with the same id: the message appears once, same seq', async () => {
    const indexedDB = new IDBFactory();
    const storage = { indexedDB, name: 'reload' };
    // Page 1 is offline: its message waits in IndexedDB; the page goes away.
    const page1 = client('alice', { storage, clientId: 'sdk-test-alice-reload' });
    await page1.start();
    await online(page1);
    page1.goOffline();
    const offlineId = await page1.send(DM, { text: 'pending at reload' });
    page1.stop();
    // A crash between the server storing a message and the page deleting
    // it from the outbox: it is stored (seq S) and still in the outbox.
    const storedId = await alice.send(DM, { text: 'stored before the crash' });
    const stored = await until('stored', () => bob.got.find((m) => m.id === storedId));
    const db = new IndexedDbOutboxStore(indexedDB, 'reload');
    await db.put({ user: 'alice', conv: DM, envelope: { id: storedId, type: 'text', body: { text: 'stored before the crash' } }, n: 0, at: Date.now() });
    db.close();
    // Page 2, the reload: same storage.
    const page2 = client('alice', { storage, clientId: 'sdk-test-alice-reload' });
    await page2.start();
    assert.deepEqual(page2.pending().map((p) => p.envelope.id).sort(), [offlineId, storedId].sort(), 'the outbox survived the reload');
    await online(page2);
    await until('both acked', () => page2.acks.length === 2);
    await until('bob gets the pending one', () => bob.got.some((m) => m.id === offlineId));
    await new Promise((r) => setTimeout(r, 500));
    assert.equal(bob.got.filter((m) => m.id === offlineId).length, 1);
    assert.equal(bob.got.filter((m) => m.id === storedId).length, 1, 'the resent one is not a new message');
    const page = await bob.history(DM, { after: stored.seq - 1, limit: 50 });
    assert.equal(page.messages.filter((m) => m.id === storedId).length, 1);
    assert.equal(page.messages.find((m) => m.id === storedId).seq, stored.seq, 'same id, same seq');
    assert.equal(page2.pending().length, 0);
    const page3 = client('alice', { storage, clientId: 'sdk-test-alice-reload' });
    await page3.start();
    assert.equal(page3.pending().length, 0, 'acknowledged messages leave IndexedDB');
    page2.stop();
    page3.stop();
    assertOnceInOrder(bob);
  });

  test('history pages back to the start', async () => {
    const { conv } = await alice.createConversation('paging', ['bob']);
    for (let i = 1; i <= 25; i++) await alice.send(conv, { text: `p${i}` });
    await until('all acked', () => alice.pending(conv).length === 0);
    const pager = client("bob", { clientId: "sdk-test-bob-pager" });
    await pager.start();
    await online(pager);
    const latest = await pager.history(conv, { limit: 10 });
    assert.equal(latest.head, 25);
    assert.deepEqual(latest.messages.map((m) => m.body.text), [16, 17, 18, 19, 20, 21, 22, 23, 24, 25].map((i) => `p${i}`));
    assert.equal(pager.lastSeq(conv), 25, 'the newest page is where live messages continue');
    const older = await pager.history(conv, { before: 16, limit: 10 });
    assert.deepEqual(older.messages.map((m) => m.seq), [6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);
    const oldest = await pager.history(conv, { before: 6, limit: 10 });
    assert.deepEqual(oldest.messages.map((m) => m.seq), [1, 2, 3, 4, 5]);
    assert.equal(oldest.first, 1);
    pager.stop();
  });

  test('edits, deletes and reactions reach the other member; history shows the result', async () => {
    const e0 = bob.events.edit.length;
    await alice.send(DM, { text: 'typo' });
    await alice.send(DM, { text: 'regret' });
    const typo = await until('bob has typo', () => bob.got.find((m) => m.body?.text === 'typo'));
    const regret = await until('bob has regret', () => bob.got.find((m) => m.body?.text === 'regret'));
    const edited = await alice.edit(DM, typo.seq, { text: 'fixed' });
    assert.ok(edited.event_seq > regret.seq);
    await until('bob sees the edit', () => bob.events.edit.length > e0);
    assert.deepEqual(bob.events.edit.at(-1).body, { text: 'fixed' });
    assert.equal(bob.events.edit.at(-1).seq, typo.seq);
    await alice.deleteMessage(DM, regret.seq);
    await until('bob sees the delete', () => bob.events.delete.some((d) => d.seq === regret.seq && d.by === 'alice'));
    const r = await bob.react(DM, typo.seq, '👍');
    assert.deepEqual(r.reactions['👍'], { count: 1, mine: true });
    await until('alice gets the summary', () => alice.events.reactions.some((e) => e.conv === DM && e.messages.some((m) => m.seq === typo.seq && m.reactions['👍']?.count === 1)));
    const page = await alice.history(DM, { after: typo.seq - 1, limit: 2 });
    const [t, g] = page.messages;
    assert.deepEqual(t.body, { text: 'fixed' });
    assert.ok(t.edited, 'marked edited');
    assert.equal(t.reactions['👍'].count, 1);
    assert.equal(g.body, null);
    assert.ok(g.deleted, 'marked deleted');
    assertOnceInOrder(bob);
  });

  test('an image attachment: alice uploads and references it, bob downloads it, carol cannot', async () => {
    const png = Buffer.concat([Buffer.from('\x89PNG\r\n\x1a\n\0\0\0\rIHDR', 'latin1'), Buffer.alloc(64, 7)]);
    const up = await alice.upload(DM, new Blob([png], { type: 'image/png' }));
    assert.match(up.id, /^[0-9a-f]{64}$/);
    await alice.send(DM, { text: 'look', attachments: [{ id: up.id, name: 'cat.png' }] });
    const m = await until('bob gets it', () => bob.got.find((x) => x.body?.attachments?.[0]?.id === up.id));
    const link = await bob.attachmentLink(m.body.attachments[0].id);
    const r = await fetch(new URL(link.url, HTTP));
    assert.equal(r.status, 200);
    assert.equal(r.headers.get('content-type'), 'image/png');
    assert.deepEqual(Buffer.from(await r.arrayBuffer()), png);
    const carol = client('carol');
    await assert.rejects(carol.attachmentLink(up.id), (e) => e.status === 404);
  });

  test('where WebSocket is blocked the client falls back to the event stream and resumes from its cursor, each seq once', async () => {
    // A WebSocket URL nothing listens on (a port just freed) stands for a network that blocks it.
    const dead = `ws://127.0.0.1:${await freedPort()}/mqtt`;
    const carolConv = directConv('bob', 'carol');
    const carol = client('carol', { url: dead, clientId: 'sdk-test-carol-stream', EventSource: FetchEventSource });
    const switched = [];
    carol.on('transport', (t) => switched.push(t));
    await carol.start();
    await online(carol);
    assert.deepEqual(switched, ['stream']);
    assert.equal(carol.transport, 'stream');
    await carol.send(carolConv, { text: 'over http' });
    await until('bob gets it', () => bob.got.some((m) => m.conv === carolConv && m.body.text === 'over http'));
    await until('carol gets hers back with its seq', () => carol.lastSeq(carolConv) === 1);
    await bob.send(carolConv, { text: 'live 1' });
    await until('carol gets live 1', () => texts(carol, carolConv).includes('live 1'));
    carol.goOffline();
    for (let i = 1; i <= 3; i++) await bob.send(carolConv, { text: `away ${i}` });
    await until('bob acked', () => bob.pending().length === 0);
    const fills = carol.stats.fills;
    carol.connectNow();
    await until('carol resumes', () => texts(carol, carolConv).length === 5);
    await new Promise((r) => setTimeout(r, 300));
    assert.deepEqual(texts(carol, carolConv), ['over http', 'live 1', 'away 1', 'away 2', 'away 3']);
    assert.deepEqual(carol.got.map((m) => m.seq), [1, 2, 3, 4, 5]);
    assert.equal(carol.stats.fills, fills, 'the stream resumed from the cursor: no history');
    const page = await carol.history(carolConv, { limit: 10 });
    assert.equal(page.messages.length, 5, 'calls go over the HTTP API');
    carol.stop();
  });

  test('presence and typing', async () => {
    const seen = [];
    alice.on('typing', (t) => seen.push(t));
    bob.typing(DM, true);
    await until('alice sees bob typing', () => seen.some((t) => t.from === 'bob' && t.typing && t.conv === DM));
    bob.goOffline();
    await until('alice sees bob offline', () => alice.events.presence.some((p) => p.user === 'bob' && p.status === 'offline'), 10_000);
    bob.connectNow();
    await until('alice sees bob online', () => alice.events.presence.at(-1)?.user === 'bob' && alice.events.presence.at(-1).status === 'online', 10_000);
  });
});
