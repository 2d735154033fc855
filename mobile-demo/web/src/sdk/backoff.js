// Reconnect delays: exponential backoff with "equal jitter". The n-th
// retry waits between half and all of min(cap, base * 2^n), so a crowd of
// clients that lost the broker at the same moment does not come back in
// step, and no client hammers it with zero delays. The one backoff of the
// SDK: both transports (MQTT over WebSocket, the SSE fallback) reconnect
// through ChatClient's loop, which asks this for each delay.

export const BASE_MS = 500;
export const CAP_MS = 30_000;

/**
 * @param {number} attempt retries so far (0 for the first)
 * @param {() => number} [random] in [0, 1)
 * @param {{baseMs?: number, capMs?: number}} [o]
 * @returns {number} milliseconds to wait
 */
export function backoffDelay(attempt, random = Math.random, o = {}) {
  const base = o.baseMs ?? BASE_MS;
  const cap = o.capMs ?? CAP_MS;
  const ceiling = Math.min(cap, base * 2 ** Math.min(Math.max(0, attempt), 16));
  return Math.round(ceiling / 2 + random() * (ceiling / 2));
}
