// Reconnect delays: exponential backoff with "equal jitter". The n-th
// retry waits between half and all of min(cap, base * 2^n), so a crowd of
// clients that lost the broker at the same moment does not come back in
// step, and no client hammers it with zero delays.

export const BASE_MS = 500;
export const CAP_MS = 30_000;

export function backoffDelay(attempt, random = Math.random) {
  const ceiling = Math.min(CAP_MS, BASE_MS * 2 ** Math.min(attempt, 16));
  return Math.round(ceiling / 2 + random() * (ceiling / 2));
}
