// chatmq's JavaScript client SDK: see README.md in this directory.

export { ChatClient, randomId } from './client.js';
export { backoffDelay, BASE_MS, CAP_MS } from './backoff.js';
export { looksLikeJwt } from './http.js';
export { IndexedDbOutboxStore, MemoryOutboxStore } from './outbox.js';

/** The id of the direct conversation of users `a` and `b`. */
export function directConv(a, b) {
  return a < b ? `dm:${a}:${b}` : `dm:${b}:${a}`;
}

/** The other user of a direct conversation, or null for a group. */
export function peerOf(conv, me) {
  const m = /^dm:([^:]+):([^:]+)$/.exec(conv);
  if (!m) return null;
  return m[1] === me ? m[2] : m[1];
}
