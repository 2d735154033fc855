// The fallback link when WebSocket is blocked (a proxy, a network):
// server-sent events from GET /v1/stream for what the broker delivers,
// the HTTP API for what the client sends. One EventSource for the link's
// life: on an error ChatClient drops the link and opens another after its
// backoff (the browser's own retry would bypass it and the cursor).
//
// The stream is an MQTT-like session of the server's (chat/+, typing/+,
// presence/+, users/{me}/events). The cursor names the last seq held of
// each conversation; the server sends what came after, then live: the
// resume of a present session, for the conversations named.

import { httpCall, httpRpc } from './http.js';

export class StreamLink {
  /**
   * @param {object} o
   * @param {string} o.httpBase '' for the page's origin
   * @param {string} o.secret a JWT
   * @param {number} o.rpcTimeoutMs
   * @param {string} o.cursor `conv:seq,conv:seq` ('' for none)
   * @param {typeof EventSource} o.EventSource
   * @param {object} on same callbacks as MqttLink's
   */
  constructor(o, on) {
    this.kind = 'stream';
    this.o = o;
    this.on = on;
    this.closed = false;
    const q = new URLSearchParams({ access_token: o.secret });
    if (o.cursor) q.set('cursor', o.cursor);
    const source = new o.EventSource(`${o.httpBase}/v1/stream?${q}`);
    this.source = source;
    source.onopen = () => {
      if (!this.closed) on.up(true);
    };
    source.onerror = () => this.lose();
    const deliver = (e) => {
      if (this.closed) return;
      let value;
      try {
        value = JSON.parse(e.data);
      } catch {
        return;
      }
      on.message(value.topic, value.payload);
    };
    for (const kind of ['chat', 'typing', 'presence', 'event']) source.addEventListener(kind, deliver);
  }

  lose() {
    if (this.closed) return;
    this.close();
    this.on.down(null);
  }

  close() {
    this.closed = true;
    this.source.close();
  }

  async subscribeSession() {}

  /** @param {string} method @param {Record<string, unknown>} params */
  rpc(method, params) {
    if (this.closed) return Promise.reject(new Error('not connected'));
    return httpRpc(this.o, method, params);
  }

  /**
   * POSTs the envelope: null once stored, the reason when refused (4xx);
   * rejects when it may not have arrived (network, 5xx): sent again.
   * @returns {Promise<string | null>}
   */
  async sendChat(conv, envelope) {
    try {
      await httpCall(this.o, 'POST', `/v1/conversations/${encodeURIComponent(conv)}/messages`, envelope);
      return null;
    } catch (err) {
      const e = /** @type {any} */ (err);
      if (e.status && e.status < 500 && e.status !== 408 && e.status !== 429) return e.code ?? e.message;
      throw err;
    }
  }

  typing(conv, typing) {
    if (this.closed) return;
    httpCall(this.o, 'POST', `/v1/conversations/${encodeURIComponent(conv)}/typing`, { typing }).catch(() => {});
  }

  /** The stream sends the retained presence of every contact when it
   *  opens: ChatClient opens it again (from its cursor). */
  refreshPresence() {
    this.lose();
  }
}
