// The HTTP API with a bearer JWT: the fallback link's way to send and to
// call, and attachments (upload, download links) on any transport.

/**
 * Calls the HTTP API; resolves with the JSON answer, rejects with the
 * API's error (`code`, `status`) or a network failure (no `status`).
 * @param {{httpBase: string, secret: string, rpcTimeoutMs: number, fetch?: typeof fetch}} o
 * @param {string} method
 * @param {string} path
 * @param {unknown} [body] JSON, or a Blob / ArrayBuffer / Uint8Array sent as it is
 * @param {string} [contentType] for a raw body
 */
export async function httpCall(o, method, path, body, contentType) {
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), o.rpcTimeoutMs);
  const raw = body instanceof ArrayBuffer || ArrayBuffer.isView(body) || (typeof Blob !== 'undefined' && body instanceof Blob);
  /** @type {Record<string, string>} */
  const headers = { authorization: `Bearer ${o.secret}` };
  if (body !== undefined) headers['content-type'] = raw ? contentType || /** @type {any} */ (body).type || 'application/octet-stream' : 'application/json';
  try {
    const r = await (o.fetch ?? fetch)(`${o.httpBase}${path}`, {
      method,
      headers,
      body: body === undefined ? undefined : raw ? /** @type {any} */ (body) : JSON.stringify(body),
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

const conv = (c) => `/v1/conversations/${encodeURIComponent(c)}`;

/**
 * The RPCs over their HTTP twins (same results).
 * @param {Parameters<typeof httpCall>[0]} o
 * @param {string} method
 * @param {Record<string, any>} p
 */
export function httpRpc(o, method, p) {
  switch (method) {
    case 'conversations':
      return httpCall(o, 'GET', '/v1/conversations');
    case 'history': {
      const q = new URLSearchParams();
      for (const k of ['after', 'before', 'limit']) if (p[k] !== undefined) q.set(k, String(p[k]));
      return httpCall(o, 'GET', `${conv(p.conv)}/messages?${q}`);
    }
    case 'read':
      return httpCall(o, 'PUT', `${conv(p.conv)}/read`, { seq: p.seq });
    case 'conversation.create':
      return httpCall(o, 'POST', '/v1/conversations', { title: p.title, members: p.members });
    case 'conversation.add':
      return httpCall(o, 'POST', `${conv(p.conv)}/members`, p.users ? { users: p.users } : { user: p.user });
    case 'conversation.remove':
      return httpCall(o, 'DELETE', `${conv(p.conv)}/members/${encodeURIComponent(p.user)}`);
    case 'conversation.mute':
      return httpCall(o, 'PUT', `${conv(p.conv)}/mute`, { muted: p.muted ?? true });
    case 'message.edit':
      return httpCall(o, 'PATCH', `${conv(p.conv)}/messages/${p.seq}`, { body: p.body });
    case 'message.delete':
      return httpCall(o, 'DELETE', `${conv(p.conv)}/messages/${p.seq}`);
    case 'reaction.add':
      return httpCall(o, 'PUT', `${conv(p.conv)}/messages/${p.seq}/reactions/${encodeURIComponent(p.emoji)}`);
    case 'reaction.remove':
      return httpCall(o, 'DELETE', `${conv(p.conv)}/messages/${p.seq}/reactions/${encodeURIComponent(p.emoji)}`);
    case 'occupancy':
      return httpCall(o, 'GET', `${conv(p.conv)}/occupancy`);
    default:
      return Promise.reject(new Error(`no HTTP twin for ${method}`));
  }
}

/** Whether a login secret is a JWT (the HTTP API takes JWTs, not passwords). */
export function looksLikeJwt(secret) {
  return /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$/.test(secret);
}
