// One MQTT-over-WebSocket connection to chatmq (MQTT.js), for its life
// only: ChatClient opens a new link after each loss, with its own backoff
// (MQTT.js's reconnectPeriod is 0). A link connects, reports CONNACK's
// session-present flag, subscribes only when asked (a present session
// keeps its subscriptions), publishes, and answers RPCs (request on
// rpc/{method}, reply on users/{me}/events matched by id).

import mqtt from 'mqtt';

const SESSION_EXPIRY_SECS = 7 * 24 * 3600;
const KEEPALIVE_SECS = 30;
const CONNECT_TIMEOUT_MS = 10_000;

// CONNACK codes that retrying cannot fix (3.1.1: 4 bad credentials,
// 5 not authorized; MQTT 5: 0x86 bad user name or password, 0x87 not
// authorized, 0x85 client id not valid, 0x8c bad authentication method).
const FATAL_CONNACK = new Set([4, 5, 0x85, 0x86, 0x87, 0x8c]);

/**
 * The subscriptions of a chat session.
 * @param {string} user
 * @returns {import('mqtt').ISubscriptionMap}
 */
export function sessionTopics(user) {
  return {
    'chat/+': { qos: 1 },
    'typing/+': { qos: 0 },
    'presence/+': { qos: 0 },
    [`users/${user}/events`]: { qos: 1 },
  };
}

export class MqttLink {
  /**
   * @param {object} o
   * @param {string} o.url
   * @param {string} o.user
   * @param {string} o.secret
   * @param {string} o.clientId
   * @param {4|5} o.protocolVersion
   * @param {number} o.rpcTimeoutMs
   * @param {object} on
   * @param {(sessionPresent: boolean) => void} on.up CONNACK accepted
   * @param {(fatal: string | null) => void} on.down lost (once); a reason when retrying cannot help
   * @param {(topic: string, value: any) => void} on.message a JSON payload that is not an RPC reply
   * @param {(packet: {cmd: string}) => void} on.packetsend every packet written (for counting)
   */
  constructor(o, on) {
    this.kind = 'websocket';
    this.o = o;
    this.on = on;
    this.nextRpc = 1;
    /** @type {Map<string, {resolve: Function, reject: Function, timer: any}>} */
    this.rpcWaiting = new Map();
    this.closed = false;
    const options = {
      clientId: o.clientId,
      username: o.user,
      password: o.secret,
      protocolVersion: o.protocolVersion,
      clean: false,
      keepalive: KEEPALIVE_SECS,
      reconnectPeriod: 0,
      connectTimeout: CONNECT_TIMEOUT_MS,
      resubscribe: false,
    };
    if (o.protocolVersion === 5) options.properties = { sessionExpiryInterval: SESSION_EXPIRY_SECS };
    const client = mqtt.connect(o.url, options);
    this.client = client;
    client.on('packetsend', (p) => on.packetsend(p));
    client.on('connect', (connack) => {
      if (!this.closed) on.up(Boolean(connack.sessionPresent));
    });
    client.on('message', (topic, payload) => this.onMessage(topic, payload));
    client.on('error', (err) => {
      if (FATAL_CONNACK.has(/** @type {any} */ (err).code)) {
        this.lose(/** @type {any} */ (err).code === 0x85 ? 'This client id belongs to another user.' : 'Wrong user id or password.');
      } else this.lose(null);
    });
    client.on('close', () => this.lose(null));
  }

  get eventsTopic() {
    return `users/${this.o.user}/events`;
  }

  /** @param {string | null} fatal */
  lose(fatal) {
    if (this.closed) return;
    this.close();
    this.on.down(fatal);
  }

  /** Ends the link without reporting it. */
  close() {
    this.closed = true;
    const c = this.client;
    c.removeAllListeners();
    c.on('error', () => {});
    c.end(true);
    for (const [id, w] of this.rpcWaiting) {
      clearTimeout(w.timer);
      w.reject(new Error('disconnected'));
      this.rpcWaiting.delete(id);
    }
  }

  /** SUBSCRIBE to the chat session's topics. */
  async subscribeSession() {
    const granted = await this.client.subscribeAsync(sessionTopics(this.o.user));
    const refused = granted.filter((g) => g.qos >= 0x80);
    if (refused.length > 0) throw new Error(`subscription refused: ${refused.map((g) => g.topic).join(', ')}`);
  }

  /** @param {Uint8Array} payload */
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
    this.on.message(topic, value);
  }

  /**
   * Calls rpc/{method}; resolves with the result, rejects on an error
   * reply (with its `code`), a timeout or the link's loss.
   * @param {string} method
   * @param {Record<string, unknown>} params
   */
  rpc(method, params) {
    if (this.closed) return Promise.reject(new Error('not connected'));
    const id = `r${Date.now().toString(36)}-${this.nextRpc++}`;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.rpcWaiting.delete(id);
        reject(new Error(`rpc ${method} timed out`));
      }, this.o.rpcTimeoutMs);
      this.rpcWaiting.set(id, { resolve, reject, timer });
      this.client.publish(`rpc/${method}`, JSON.stringify({ id, ...params }), { qos: 1 });
    });
  }

  /**
   * Publishes a chat envelope at QoS 1. Resolves with null once the
   * broker acknowledged it (on its disk), with the reason when it refused
   * it (MQTT 5 PUBACK >= 0x80); rejects if the link was lost first (the
   * message stays in the outbox and is sent again).
   * @param {string} conv
   * @param {object} envelope
   * @returns {Promise<string | null>}
   */
  sendChat(conv, envelope) {
    return new Promise((resolve, reject) => {
      if (this.closed) return reject(new Error('not connected'));
      this.client.publish(`chat/${conv}`, JSON.stringify(envelope), { qos: 1 }, (err) => {
        if (!err) return resolve(null);
        const code = /** @type {any} */ (err).code;
        if (typeof code === 'number' && code >= 0x80) return resolve(err.message || `refused (0x${code.toString(16)})`);
        reject(err);
      });
    });
  }

  /** @param {string} conv @param {boolean} typing */
  typing(conv, typing) {
    if (!this.closed) this.client.publish(`typing/${conv}`, JSON.stringify({ typing }), { qos: 0 });
  }

  /** Subscribes to presence again: the broker sends the retained state of
   *  every contact, including ones gained since. */
  refreshPresence() {
    if (!this.closed) this.client.subscribe('presence/+', { qos: 0 });
  }
}
