// ChatClient: the chatmq client for browsers and Node. One reconnect loop
// (backoff with jitter) over either transport: MQTT over WebSocket
// (MqttLink), or, when WebSocket never connects and the secret is a JWT,
// the SSE stream plus the HTTP API (StreamLink) for the client's life.
//
// What it guarantees to the app:
// - every sequenced message of a conversation is emitted once, in seq
//   order, from the first one it sees (or the position given with
//   `resumeFrom`), whether it came live, from the session's replay, from
//   the stream's resume or from history filling a gap ("message");
// - on a reconnection, a present session (CONNACK session present, or the
//   stream's cursor) is trusted: no SUBSCRIBE and no history; a new
//   session subscribes once and fills each conversation from its last seq;
//   a live seq past a hole fills only that conversation's hole;
// - a message given to `send` is in the outbox (IndexedDB where there is
//   one) before `send` resolves, and is sent again on each connection
//   with the same envelope id until the server acknowledges or refuses it,
//   by this client or by the next one on the same storage (a reload).

import { backoffDelay } from './backoff.js';
import { Emitter } from './emitter.js';
import { httpCall, looksLikeJwt } from './http.js';
import { MqttLink } from './mqtt-link.js';
import { openOutboxStore } from './outbox.js';
import { StreamLink } from './stream-link.js';

const FILL_PAGE = 200; // the broker's default history cap
const MAX_CURSOR_CONVS = 256; // what /v1/stream's cursor takes
// Live messages held behind a hole while history fills it, per
// conversation. Past it they are dropped: the fill fetches them too (it
// runs to the head), and a later one past a hole starts another fill.
const MAX_HELD = 5000;

/** @typedef {import('./index.js').ChatClientOptions} ChatClientOptions */
/** @typedef {import('./index.js').Message} Message */
/** @typedef {import('./index.js').OutboxItem} OutboxItem */

export class ChatClient extends Emitter {
  /** @param {ChatClientOptions} o */
  constructor(o) {
    super();
    /** @type {ChatClientOptions & {clientId: string, protocolVersion: 4 | 5, transport: 'auto' | 'websocket' | 'stream', httpBase: string, rpcTimeoutMs: number, random: () => number}} */
    this.o = {
      protocolVersion: 5,
      transport: 'auto',
      httpBase: '',
      rpcTimeoutMs: 10_000,
      random: Math.random,
      ...o,
      clientId: o.clientId || `sdk-${o.user}-${randomId()}`.slice(0, 64),
    };
    /** @type {'idle'|'connecting'|'online'|'waiting'|'offline'|'stopped'} */
    this.state = 'idle';
    /** @type {'websocket'|'stream'} */
    this.transport = this.o.transport === 'stream' ? 'stream' : 'websocket';
    /** @type {MqttLink | StreamLink | null} */
    this.link = null;
    this.attempt = 0;
    /** @type {ReturnType<typeof setTimeout> | undefined} */
    this.timer = undefined;
    this.stopped = false;
    this.everConnected = false;
    /** Counters a test or a status page can read. */
    this.stats = { connects: 0, sessionPresent: 0, subscribes: 0, resent: 0, fills: 0 };
    /** @type {Map<string, {hi: number, filling: Promise<void> | null, held: Map<number, Message>}>} */
    this.convs = new Map();
    /** @type {Map<string, OutboxItem & {sentOn?: object}>} */
    this.outbox = new Map();
    this.outboxSeq = 0;
    this.store = openOutboxStore(this.o);
    this.loaded = this.store.load(o.user).then(
      (items) => {
        for (const item of items) {
          this.outbox.set(key(item.conv, item.envelope.id), item);
          this.outboxSeq = Math.max(this.outboxSeq, item.n);
        }
      },
      (e) => this.emit('error', e),
    );
    this.onOnline = () => this.connectNow();
    this.onOffline = () => this.goOffline();
  }

  get user() {
    return this.o.user;
  }

  // ---- the connection -----------------------------------------------------

  /** Connects (and keeps connecting until `stop`). Resolves once the
   *  persisted outbox is loaded. */
  async start() {
    this.stopped = false;
    if (typeof globalThis.addEventListener === 'function') {
      globalThis.addEventListener('online', this.onOnline);
      globalThis.addEventListener('offline', this.onOffline);
    }
    await this.loaded;
    if (this.stopped) return;
    if (globalThis.navigator?.onLine === false) this.goOffline();
    else this.connectNow();
  }

  /** Ends the connection for good (log out, or a page going away). The
   *  outbox stays in storage for the next client of this user. */
  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    if (typeof globalThis.removeEventListener === 'function') {
      globalThis.removeEventListener('online', this.onOnline);
      globalThis.removeEventListener('offline', this.onOffline);
    }
    this.drop();
    this.setState('stopped');
    this.store.close();
  }

  /** Drops the connection and connects again at once (after the browser
   *  says it is online again, for instance). */
  connectNow() {
    if (this.stopped) return;
    clearTimeout(this.timer);
    this.attempt = 0;
    this.drop();
    this.connect();
  }

  /** The network is gone: close now rather than wait for keepalive, and
   *  wait for `online` (or `connectNow`) instead of retrying in vain. */
  goOffline() {
    clearTimeout(this.timer);
    this.drop();
    this.setState('offline');
  }

  setState(state, detail) {
    this.state = state;
    this.emit('status', state, detail);
  }

  drop() {
    const l = this.link;
    this.link = null;
    l?.close();
  }

  connect() {
    this.setState('connecting');
    const callbacks = {
      up: (present) => this.onUp(link, present),
      down: (fatal) => this.onDown(link, fatal),
      message: (topic, value) => this.onDelivery(topic, value),
      packetsend: (p) => {
        if (p.cmd === 'subscribe') this.stats.subscribes++;
      },
    };
    /** @type {MqttLink | StreamLink} */
    let link;
    if (this.transport === 'stream') {
      const EventSourceImpl = this.o.EventSource ?? globalThis.EventSource;
      link = new StreamLink({ ...this.o, cursor: this.cursor(), EventSource: EventSourceImpl }, callbacks);
    } else {
      link = new MqttLink(this.o, callbacks);
    }
    this.link = link;
  }

  /** `conv:seq,...` of the conversations held, for the stream's resume. */
  cursor() {
    const parts = [];
    for (const [conv, c] of this.convs) {
      if (c.hi > 0 && parts.length < MAX_CURSOR_CONVS) parts.push(`${conv}:${c.hi}`);
    }
    return parts.join(',');
  }

  async onUp(link, sessionPresent) {
    if (this.link !== link) return;
    this.everConnected = true;
    this.stats.connects++;
    // The stream resumes only the conversations its cursor named.
    const resumed = link.kind === 'stream' ? new Set(link.o.cursor.split(',').filter(Boolean).map((p) => p.slice(0, p.lastIndexOf(':')))) : null;
    if (sessionPresent && link.kind === 'websocket') this.stats.sessionPresent++;
    if (!sessionPresent) {
      try {
        await link.subscribeSession();
      } catch {
        if (this.link === link) this.onDown(link, null);
        return;
      }
      if (this.link !== link) return;
    }
    this.attempt = 0;
    this.setState('online');
    for (const item of this.outbox.values()) this.transmit(item);
    this.emit('connected', { sessionPresent, transport: link.kind });
    // A new session knows nothing of what was missed: fill each
    // conversation held from its last seq. A present one replays it.
    for (const [conv, c] of this.convs) {
      const missed = link.kind === 'stream' ? c.hi > 0 && !resumed?.has(conv) : !sessionPresent && c.hi > 0;
      if (missed || c.held.size > 0) this.fill(conv).catch(() => {});
    }
  }

  onDown(link, fatal) {
    if (this.link !== link) return;
    this.link = null;
    link.close();
    if (fatal) {
      this.stop();
      this.emit('fatal', fatal);
      return;
    }
    // Never connected at all: WebSocket may be blocked on this network.
    if (!this.everConnected && this.transport === 'websocket' && this.o.transport === 'auto' && looksLikeJwt(this.o.secret) && (this.o.EventSource ?? globalThis.EventSource)) {
      this.transport = 'stream';
      this.emit('transport', 'stream');
      this.connect();
      return;
    }
    this.scheduleRetry();
  }

  scheduleRetry() {
    if (this.stopped) return;
    if (globalThis.navigator?.onLine === false) {
      this.setState('offline');
      return;
    }
    const delay = backoffDelay(this.attempt++, this.o.random, this.o.backoff);
    this.setState('waiting', delay);
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.connect(), delay);
  }

  // ---- what the server delivers -------------------------------------------

  conv(id) {
    let c = this.convs.get(id);
    if (!c) this.convs.set(id, (c = { hi: 0, filling: null, held: new Map() }));
    return c;
  }

  onDelivery(topic, value) {
    if (!value || typeof value !== 'object') return;
    const slash = topic.indexOf('/');
    const kind = topic.slice(0, slash);
    const name = topic.slice(slash + 1);
    if (kind === 'chat') this.live(value);
    else if (kind === 'typing') {
      if (value.from === this.user) return;
      this.emit('typing', { conv: value.conv ?? name, from: value.from, typing: value.state?.typing !== false });
    } else if (kind === 'presence') this.emit('presence', { user: name, status: value.status, ts: value.ts });
    else if (kind === 'users') this.onEvent(value);
    else this.emit('publish', topic, value);
  }

  onEvent(event) {
    switch (event.type) {
      case 'read':
        this.emit('read', { conv: event.conv, user: event.user, seq: event.seq });
        break;
      case 'reads':
        for (const [user, seq] of Object.entries(event.reads ?? {})) this.emit('read', { conv: event.conv, user, seq });
        break;
      case 'reactions':
        this.emit('reactions', { conv: event.conv, messages: event.messages ?? [] });
        break;
      case 'error': {
        // MQTT 3.1.1 has no reason codes: a refused message is reported here.
        const conv = typeof event.topic === 'string' && event.topic.startsWith('chat/') ? event.topic.slice(5) : null;
        if (conv && event.id) this.settle(conv, event.id, event.code ?? 'refused', undefined, true);
        break;
      }
      default:
    }
    this.emit('event', event);
  }

  /** A live (or replayed, or resumed) chat message. */
  live(m) {
    if (typeof m.conv !== 'string' || !Number.isSafeInteger(m.seq)) return;
    const c = this.conv(m.conv);
    if (m.seq <= c.hi) return; // seen
    if (c.filling || (c.hi > 0 && m.seq > c.hi + 1)) {
      // A hole before it: held until history fills it.
      if (c.held.size < MAX_HELD) c.held.set(m.seq, m);
      if (!c.filling && this.state === 'online') this.fill(m.conv).catch(() => {});
      return;
    }
    this.accept(c, m);
  }

  /** @param {Message} m */
  accept(c, m) {
    if (m.seq <= c.hi) return;
    c.hi = m.seq;
    c.held.delete(m.seq);
    this.emit('message', m);
    if (m.type === 'message.edit') this.emit('edit', { conv: m.conv, seq: m.target, eventSeq: m.seq, by: m.from, body: m.body, ts: m.ts });
    else if (m.type === 'message.delete') this.emit('delete', { conv: m.conv, seq: m.target, eventSeq: m.seq, by: m.from, ts: m.ts });
    if (m.from === this.user) this.settle(m.conv, m.id, null, m.seq);
  }

  /**
   * Fetches what follows the last seq held of `conv`, page by page up to
   * the head, then what was held back behind the hole. One at a time per
   * conversation.
   * @param {string} conv
   */
  fill(conv) {
    const c = this.conv(conv);
    if (c.filling) return c.filling;
    this.stats.fills++;
    c.filling = (async () => {
      try {
        for (;;) {
          const page = await this.rpc('history', { conv, after: c.hi, limit: FILL_PAGE });
          const msgs = [...page.messages].sort((a, b) => a.seq - b.seq);
          for (const m of msgs) this.accept(c, m); // history is what exists: its holes are final
          if (msgs.length === 0 || c.hi >= (page.head ?? 0)) break;
        }
      } finally {
        c.filling = null;
      }
      for (const seq of [...c.held.keys()].sort((a, b) => a - b)) {
        const m = c.held.get(seq);
        if (m) this.accept(c, m);
      }
    })();
    return c.filling;
  }

  /** The last seq emitted of `conv` (0: none). */
  lastSeq(conv) {
    return this.convs.get(conv)?.hi ?? 0;
  }

  /**
   * Declares what the app already holds of `conv` (from its own storage,
   * or a history page it showed): messages up to `seq` are not emitted
   * again, and the next reconnection without a session fills from there.
   * @param {string} conv @param {number} seq
   */
  resumeFrom(conv, seq) {
    const c = this.conv(conv);
    if (seq > c.hi) {
      c.hi = seq;
      for (const s of [...c.held.keys()]) if (s <= seq) c.held.delete(s);
    }
  }

  // ---- calls --------------------------------------------------------------

  /**
   * An RPC (over MQTT, or its HTTP twin on the fallback).
   * @param {string} method
   * @param {Record<string, unknown>} [params]
   */
  rpc(method, params = {}) {
    const link = this.link;
    if (!link || this.state !== 'online') return Promise.reject(new Error('not connected'));
    return link.rpc(method, params);
  }

  conversations() {
    return this.rpc('conversations');
  }

  /**
   * A page of history. Without `after` or `before`, the newest page: the
   * client then takes its newest seq as the position to resume from.
   * @param {string} conv
   * @param {{after?: number, before?: number, limit?: number}} [q]
   */
  async history(conv, q = {}) {
    const page = await this.rpc('history', { conv, ...q });
    if (q.after === undefined && q.before === undefined) {
      const newest = Math.max(0, ...page.messages.map((m) => m.seq));
      if (this.lastSeq(conv) === 0 && newest > 0) this.resumeFrom(conv, newest);
    }
    return page;
  }

  createConversation(title, members) {
    return this.rpc('conversation.create', { title, members });
  }

  read(conv, seq) {
    return this.rpc('read', { conv, seq });
  }

  edit(conv, seq, body) {
    return this.rpc('message.edit', { conv, seq, body });
  }

  deleteMessage(conv, seq) {
    return this.rpc('message.delete', { conv, seq });
  }

  react(conv, seq, emoji) {
    return this.rpc('reaction.add', { conv, seq, emoji });
  }

  unreact(conv, seq, emoji) {
    return this.rpc('reaction.remove', { conv, seq, emoji });
  }

  occupancy(conv) {
    return this.rpc('occupancy', { conv });
  }

  /** A typing indicator (QoS 0, never stored): best effort. */
  typing(conv, typing) {
    if (this.state === 'online') this.link?.typing(conv, typing);
  }

  /** Learns the presence of contacts gained since the connection began. */
  refreshPresence() {
    if (this.state !== 'online' || !this.link) return;
    if (this.link.kind === 'stream') this.connectNow();
    else this.link.refreshPresence();
  }

  /**
   * Uploads a file to `conv` over the HTTP API (a JWT login only):
   * `{id, size, content_type, url}`; reference it in a body as
   * `{attachments: [{id}]}`.
   * @param {string} conv
   * @param {Blob | ArrayBuffer | Uint8Array} file
   * @param {string} [contentType] default: the Blob's type
   */
  upload(conv, file, contentType) {
    return httpCall(this.o, 'POST', `/v1/conversations/${encodeURIComponent(conv)}/attachments`, file, contentType);
  }

  /** A signed download link for an attachment, for `<img src>`: `{token, url, expires}`
   *  (`url` is relative to `httpBase`). */
  attachmentLink(id) {
    return httpCall(this.o, 'POST', `/v1/attachments/${encodeURIComponent(id)}/token`);
  }

  // ---- sending ------------------------------------------------------------

  /**
   * Sends a chat message: stored in the outbox (durably, where IndexedDB
   * is) before this resolves, sent now if online, else on the next
   * connection ("error" reports a storage failure; it is still sent).
   * "acked" reports the outcome; the message itself comes
   * back as a "message" with its seq.
   * @param {string} conv
   * @param {unknown} body
   * @param {{id?: string, type?: string}} [o]
   * @returns {Promise<string>} the envelope id
   */
  async send(conv, body, o = {}) {
    const id = o.id ?? randomId();
    const envelope = { id, type: o.type ?? 'text', body };
    const item = { user: this.user, conv, envelope, n: ++this.outboxSeq, at: Date.now() };
    this.outbox.set(key(conv, id), item);
    // A storage failure (quota, a private window without IndexedDB) is
    // reported and the message is still sent from memory: only a reload
    // before it is acknowledged would lose it.
    await this.store.put(item).catch((e) => this.emit('error', e));
    if (this.state === 'online' && this.outbox.has(key(conv, id))) this.transmit(item);
    return id;
  }

  /** What is waiting to be acknowledged, oldest first. */
  pending(conv) {
    return [...this.outbox.values()].filter((i) => conv === undefined || i.conv === conv).map(({ sentOn, ...i }) => i);
  }

  transmit(item) {
    const link = this.link;
    if (!link || item.sentOn === link) return;
    if (item.sentOn) this.stats.resent++;
    item.sentOn = link;
    link.sendChat(item.conv, item.envelope).then(
      (refused) => this.settle(item.conv, item.envelope.id, refused),
      () => {
        if (item.sentOn === link) item.sentOn = undefined; // lost with the link: sent again on the next
      },
    );
  }

  /** The server took (error null) or refused message `id`; `always`
   *  reports it even when no longer pending (a 3.1.1 refusal comes after
   *  its PUBACK). */
  settle(conv, id, error, seq, always = false) {
    const k = key(conv, id);
    if (!this.outbox.has(k)) {
      if (always) this.emit('acked', { conv, id, error, seq });
      return;
    }
    this.outbox.delete(k);
    this.store.delete(this.user, conv, id).catch((e) => this.emit('error', e));
    this.emit('acked', { conv, id, error, seq });
  }
}

function key(conv, id) {
  return `${conv}\u0000${id}`;
}

/** A random id: 16 base-36 characters from the platform's CSPRNG. */
export function randomId() {
  const words = globalThis.crypto.getRandomValues(new Uint32Array(3));
  return [...words].map((n) => n.toString(36)).join('').slice(0, 16);
}
