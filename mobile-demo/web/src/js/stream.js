// The fallback link to chatmq when WebSocket is blocked (a proxy, a
// network): server-sent events from GET /v1/stream for what the broker
// delivers, the HTTP API for what the page sends. The same interface as
// Connection (connection.js), so app.js does not care which one it has.
//
// The stream is an MQTT session of ours on the server (chat/+, typing/+,
// presence/+, users/{me}/events). Each chat event has an id naming the
// last seq sent of each conversation; a reconnect (the browser's own, or
// ours after going offline) presents it, and the server sends what came
// after, then live: no gap, no duplicate. app.js's sync after each
// (re)connection fills from history as well; Conversations deduplicates.
//
// The HTTP API takes a JWT, not a password: this link needs a JWT login.

import { backoffDelay } from '../sdk/backoff.js';

const RPC_TIMEOUT_MS = 10_000;

export class StreamLink {
  /** Same options as Connection; `secret` must be a JWT. */
  constructor(o) {
    this.o = o;
    this.source = null;
    this.state = 'idle';
    this.attempt = 0;
    this.timer = null;
    this.stopped = false;
    this.lastId = ''; // the last event id: where a reconnect resumes
    this.outbox = new Map(); // envelope id -> {conv, envelope}
    this.onOnline = () => this.connectNow();
    this.onOffline = () => this.goOffline();
    window.addEventListener('online', this.onOnline);
    window.addEventListener('offline', this.onOffline);
  }

  get eventsTopic() {
    return `users/${this.o.user}/events`;
  }

  start() {
    if (navigator.onLine === false) this.goOffline();
    else this.connectNow();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    window.removeEventListener('online', this.onOnline);
    window.removeEventListener('offline', this.onOffline);
    this.drop();
    this.setState('idle');
  }

  setState(state, detail) {
    this.state = state;
    this.o.on.status(state, detail);
  }

  goOffline() {
    clearTimeout(this.timer);
    this.drop();
    this.setState('offline');
  }

  connectNow() {
    if (this.stopped) return;
    clearTimeout(this.timer);
    this.attempt = 0;
    this.drop();
    this.connect();
  }

  drop() {
    const s = this.source;
    this.source = null;
    if (s) s.close();
  }

  scheduleRetry() {
    if (this.stopped) return;
    if (navigator.onLine === false) {
      this.setState('offline');
      return;
    }
    const delay = backoffDelay(this.attempt++);
    this.setState('waiting', delay);
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.connect(), delay);
  }

  connect() {
    this.setState('connecting');
    const q = new URLSearchParams({ access_token: this.o.secret });
    if (this.lastId) q.set('cursor', this.lastId);
    const source = new EventSource(`/v1/stream?${q}`);
    this.source = source;
    source.onopen = () => {
      if (this.source !== source) return;
      this.attempt = 0;
      this.setState('online');
      for (const [id, m] of this.outbox) this.transmit(id, m);
      this.o.on.connected();
    };
    source.onerror = () => {
      if (this.source !== source) return;
      // Our own reconnect (with the cursor, and our backoff) rather than
      // the browser's: it also covers refusals (401, 429), which end it.
      this.drop();
      this.scheduleRetry();
    };
    const deliver = (e) => {
      if (this.source !== source) return;
      if (e.lastEventId) this.lastId = e.lastEventId;
      let value;
      try {
        value = JSON.parse(e.data);
      } catch {
        return;
      }
      this.o.on.message(value.topic, value.payload);
    };
    for (const kind of ['chat', 'typing', 'presence', 'event']) source.addEventListener(kind, deliver);
  }

  /** An HTTP call with the JWT; resolves with the JSON answer, rejects
   *  with the API's error (`code`) or a network failure (no `status`). */
  async call(method, path, body) {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), RPC_TIMEOUT_MS);
    try {
      const r = await fetch(path, {
        method,
        headers: { authorization: `Bearer ${this.o.secret}`, 'content-type': 'application/json' },
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: ctl.signal,
      });
      const value = await r.json().catch(() => ({}));
      if (!r.ok) {
        throw Object.assign(new Error(value.error?.message ?? `HTTP ${r.status}`), { code: value.error?.code, status: r.status });
      }
      return value;
    } finally {
      clearTimeout(timer);
    }
  }

  /** The RPCs the page uses, over their HTTP twins (same results). */
  rpc(method, p = {}) {
    if (this.state !== 'online') return Promise.reject(new Error('not connected'));
    const conv = (c) => `/v1/conversations/${encodeURIComponent(c)}`;
    switch (method) {
      case 'conversations':
        return this.call('GET', '/v1/conversations');
      case 'history': {
        const q = new URLSearchParams();
        for (const k of ['after', 'before', 'limit']) if (p[k] !== undefined) q.set(k, String(p[k]));
        return this.call('GET', `${conv(p.conv)}/messages?${q}`);
      }
      case 'read':
        return this.call('PUT', `${conv(p.conv)}/read`, { seq: p.seq });
      case 'conversation.create':
        return this.call('POST', '/v1/conversations', { title: p.title, members: p.members });
      default:
        return Promise.reject(new Error(`no HTTP twin for ${method}`));
    }
  }

  /** Queues a chat message; it is (re)sent until the server answers,
   *  which means it is on disk (a retry of the same id gets the same seq). */
  send(conv, envelope) {
    const m = { conv, envelope };
    this.outbox.set(envelope.id, m);
    if (this.state === 'online') this.transmit(envelope.id, m);
  }

  transmit(id, m) {
    this.call('POST', `/v1/conversations/${encodeURIComponent(m.conv)}/messages`, m.envelope).then(
      () => {
        if (!this.outbox.delete(id)) return;
        this.o.on.acked(m.conv, id, null);
      },
      (err) => {
        if (!err.status || err.status >= 500) return; // not refused: sent again on the next connection
        if (!this.outbox.delete(id)) return;
        this.o.on.acked(m.conv, id, err.message);
      },
    );
  }

  typing(conv, typing) {
    if (this.state !== 'online') return;
    this.call('POST', `/v1/conversations/${encodeURIComponent(conv)}/typing`, { typing }).catch(() => {});
  }

  /** The stream gets the retained presence of every contact when it
   *  opens: opening it again (from where it is) learns new contacts'. */
  refreshPresence() {
    if (this.state !== 'online') return;
    this.connectNow();
  }
}

/** Whether a login secret is a JWT (the fallback needs one). */
export function looksLikeJwt(secret) {
  return /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$/.test(secret);
}
