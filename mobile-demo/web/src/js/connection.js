// The MQTT link to chatmq: one MQTT.js client at a time over WebSocket.
//
// Owns connecting, the reconnect policy (our own exponential backoff with
// jitter; MQTT.js's reconnectPeriod is 0), the browser's online/offline
// events, RPC calls (request on rpc/{method}, reply on users/{me}/events
// matched by id) and the outbox of chat messages not yet acknowledged.
// It knows nothing of the page: it reports through callbacks.
//
// The session is persistent (clean: false, and an MQTT 5 session expiry),
// under a client id stable per browser and user, so the broker keeps a
// cursor per conversation and replays what was missed on reconnect.

import mqtt from 'mqtt';
import { backoffDelay } from '../sdk/backoff.js';

const SESSION_EXPIRY_SECS = 7 * 24 * 3600;
const RPC_TIMEOUT_MS = 10_000;
const KEEPALIVE_SECS = 30;

// CONNACK codes that retrying cannot fix (3.1.1: 4 bad credentials,
// 5 not authorized; MQTT 5: 0x86, 0x87, 0x85 bad client id).
const FATAL_CONNACK = new Set([4, 5, 0x85, 0x86, 0x87, 0x8c]);

export class Connection {
  /**
   * @param {object} o
   * @param {string} o.url ws:// or wss:// URL of the broker
   * @param {string} o.user user id (MQTT user name)
   * @param {string} o.secret password or JWT
   * @param {string} o.clientId stable per browser and user
   * @param {4|5} o.protocolVersion
   * @param {object} o.on callbacks: status(state, detail), connected(),
   *   message(topic, payload), fatal(reason), acked(conv, id, error),
   *   unreachable() (optional: the first connection failed)
   */
  constructor(o) {
    this.o = o;
    this.client = null;
    this.state = 'idle';
    this.attempt = 0;
    this.timer = null;
    this.stopped = false;
    this.everConnected = false;
    this.nextRpc = 1;
    this.rpcWaiting = new Map(); // id -> {resolve, reject, timer}
    this.outbox = new Map(); // envelope id -> {conv, payload}
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

  /** Ends the link for good (log out). */
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

  /** The browser says the network is gone: close now rather than wait for
   *  keepalive, and wait for `online` instead of retrying in vain. */
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
    const c = this.client;
    this.client = null;
    if (c) {
      c.removeAllListeners();
      c.on('error', () => {});
      c.end(true);
    }
    for (const [id, w] of this.rpcWaiting) {
      clearTimeout(w.timer);
      w.reject(new Error('disconnected'));
      this.rpcWaiting.delete(id);
    }
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
    const { url, user, secret, clientId, protocolVersion } = this.o;
    this.setState('connecting');
    const options = {
      clientId,
      username: user,
      password: secret,
      protocolVersion,
      clean: false,
      keepalive: KEEPALIVE_SECS,
      reconnectPeriod: 0,
      connectTimeout: 10_000,
      resubscribe: false,
    };
    if (protocolVersion === 5) {
      options.properties = { sessionExpiryInterval: SESSION_EXPIRY_SECS };
    }
    const client = mqtt.connect(url, options);
    this.client = client;
    let lost = false;
    const lose = () => {
      if (lost || this.client !== client) return;
      lost = true;
      this.drop();
      // Never connected at all: WebSocket may be blocked on this network;
      // the page may switch to the HTTP fallback (stream.js).
      if (!this.everConnected && this.o.on.unreachable) this.o.on.unreachable();
      this.scheduleRetry();
    };
    client.on('connect', () => {
      this.everConnected = true;
      this.onConnect(client);
    });
    client.on('message', (topic, payload) => this.onMessage(topic, payload));
    client.on('error', (err) => {
      if (FATAL_CONNACK.has(err.code)) {
        this.stop();
        this.o.on.fatal(err.code === 0x85 ? 'This client id belongs to another user.' : 'Wrong user id or password.');
        return;
      }
      lose();
    });
    client.on('close', lose);
  }

  async onConnect(client) {
    const topics = {
      'chat/+': { qos: 1 },
      'typing/+': { qos: 0 },
      'presence/+': { qos: 0 },
      [this.eventsTopic]: { qos: 1 },
    };
    try {
      await client.subscribeAsync(topics);
    } catch {
      return; // the close handler retries
    }
    if (this.client !== client) return;
    this.attempt = 0;
    this.setState('online');
    // Messages sent while away: the broker deduplicates by (conv, sender, id).
    for (const [id, m] of this.outbox) this.transmit(id, m);
    this.o.on.connected();
  }

  onMessage(topic, payload) {
    let value;
    try {
      value = JSON.parse(new TextDecoder().decode(payload));
    } catch {
      return;
    }
    if (topic === this.eventsTopic && value && value.type === 'rpc') {
      const w = this.rpcWaiting.get(value.id);
      if (!w) return;
      this.rpcWaiting.delete(value.id);
      clearTimeout(w.timer);
      if (value.ok) w.resolve(value.result);
      else w.reject(Object.assign(new Error(value.error?.message ?? 'rpc failed'), { code: value.error?.code }));
      return;
    }
    this.o.on.message(topic, value);
  }

  /** Calls rpc/{method}; resolves with the result, rejects on error,
   *  timeout or disconnection. */
  rpc(method, params = {}) {
    const client = this.client;
    if (!client || this.state !== 'online') return Promise.reject(new Error('not connected'));
    const id = `r${Date.now().toString(36)}-${this.nextRpc++}`;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.rpcWaiting.delete(id);
        reject(new Error(`rpc ${method} timed out`));
      }, RPC_TIMEOUT_MS);
      this.rpcWaiting.set(id, { resolve, reject, timer });
      client.publish(`rpc/${method}`, JSON.stringify({ id, ...params }), { qos: 1 });
    });
  }

  /** Queues a chat message; it is (re)sent on every connection until the
   *  broker acknowledges it, which means it is on disk. */
  send(conv, envelope) {
    const m = { conv, payload: JSON.stringify(envelope) };
    this.outbox.set(envelope.id, m);
    if (this.state === 'online') this.transmit(envelope.id, m);
  }

  transmit(id, m) {
    const client = this.client;
    client.publish(`chat/${m.conv}`, m.payload, { qos: 1 }, (err) => {
      if (this.client !== client && err) return; // lost with the link: resent later
      if (err && !isRefusal(err)) return;
      this.outbox.delete(id);
      this.o.on.acked(m.conv, id, err ? err.message : null);
    });
  }

  /** A typing indicator (QoS 0, never stored): best effort. */
  typing(conv, typing) {
    if (this.state !== 'online') return;
    this.client.publish(`typing/${conv}`, JSON.stringify({ typing }), { qos: 0 });
  }

  /** Subscribes again so the broker sends the retained presence of every
   *  contact, including ones gained since the last subscription. */
  refreshPresence() {
    if (this.state !== 'online') return;
    this.client.subscribe('presence/+', { qos: 0 });
  }
}

// MQTT 5 PUBACK with a reason code >= 0x80: the broker refused the message
// (not a member, bad envelope, too large). MQTT.js reports it as an error
// carrying the code; a lost connection has no code.
function isRefusal(err) {
  return typeof err.code === 'number' && err.code >= 0x80;
}
