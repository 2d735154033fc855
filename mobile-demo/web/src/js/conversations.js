// What the page knows about the user's conversations: messages by
// (conv, seq), messages of ours still pending (by envelope id), read
// positions, unread counts, presence and who is typing. Pure state: no
// MQTT and no DOM, so the rules (deduplication, contiguous ranges) live in
// one place.
//
// The messages held for a conversation always form one contiguous range of
// seqs [lo, hi]: the SDK delivers each conversation's messages in seq
// order without holes, scrolling up asks for what precedes lo. A change
// record (an edit or a delete: `type` "message.edit" / "message.delete")
// holds its seq in the range, hidden, and changes the message it targets.

export { directConv, peerOf } from '../sdk/index.js';

export class Conversation {
  constructor(id) {
    this.id = id;
    this.title = '';
    this.head = 0; // the newest seq known to exist
    this.read = 0; // my read position, as shown
    this.readSent = 0; // my read position, as the broker knows it
    this.peerRead = 0; // the furthest another member has read
    this.bySeq = new Map(); // seq -> message
    this.pending = new Map(); // envelope id -> message without seq yet
    this.lo = 0; // lowest seq held (0: none)
    this.hi = 0; // highest seq held
    this.first = 0; // the oldest seq the broker still has (0: unknown)
    this.loadedLatest = false; // has the latest page been fetched once
  }

  get unread() {
    return Math.max(0, this.head - this.read);
  }

  get atStart() {
    return this.first > 0 && this.lo > 0 && this.lo <= this.first;
  }
}

export class Conversations {
  constructor(me) {
    this.me = me;
    this.byId = new Map();
    this.presence = new Map(); // user -> 'online' | 'offline'
    this.typing = new Map(); // conv -> Map(user -> expiry ms)
  }

  get(id) {
    let c = this.byId.get(id);
    if (!c) {
      c = new Conversation(id);
      this.byId.set(id, c);
    }
    return c;
  }

  has(id) {
    return this.byId.has(id);
  }

  /** Newest activity first. */
  list() {
    return [...this.byId.values()].sort((a, b) => lastTs(b) - lastTs(a) || a.id.localeCompare(b.id));
  }

  /** Merges one row of rpc/conversations. */
  mergeSummary(row) {
    const c = this.get(row.conv);
    c.title = row.title || c.title;
    c.head = Math.max(c.head, row.head ?? 0);
    c.read = Math.max(c.read, row.read ?? 0);
    c.readSent = Math.max(c.readSent, row.read ?? 0);
    return c;
  }

  /**
   * Adds a delivered message. Returns {added, replaced}: added is false
   * for a duplicate or a message that would leave a hole; replaced is the
   * pending message of ours it confirms, if any.
   */
  add(m) {
    const c = this.get(m.conv);
    c.head = Math.max(c.head, m.seq);
    if (c.bySeq.has(m.seq)) return { added: false, conv: c };
    const contiguous = c.hi === 0 || (m.seq >= c.lo - 1 && m.seq <= c.hi + 1);
    if (!contiguous) return { added: false, gap: true, conv: c };
    let replaced = null;
    if (m.from === this.me && c.pending.has(m.id)) {
      replaced = c.pending.get(m.id);
      c.pending.delete(m.id);
    }
    const msg = { ...m, state: 'delivered' };
    if (m.type === 'message.edit' || m.type === 'message.delete') {
      msg.hidden = true;
      const target = c.bySeq.get(m.target);
      if (target && m.type === 'message.delete') {
        target.body = null;
        target.deleted = { seq: m.seq, by: m.from, ts: m.ts };
      } else if (target && !m.deleted && !target.deleted) {
        target.body = m.body;
        target.edited = { seq: m.seq, by: m.from, ts: m.ts };
      }
    }
    c.bySeq.set(m.seq, msg);
    c.lo = c.lo === 0 ? m.seq : Math.min(c.lo, m.seq);
    c.hi = Math.max(c.hi, m.seq);
    if (m.from === this.me && c.read === m.seq - 1) c.read = m.seq;
    return { added: true, msg, replaced, conv: c };
  }

  /** A message of ours, shown at once and pending until acknowledged. */
  addPending(conv, id, body) {
    const c = this.get(conv);
    const msg = { conv, id, from: this.me, body, ts: Date.now(), state: 'pending' };
    c.pending.set(id, msg);
    return msg;
  }

  /** The broker acknowledged (or refused) our message `id`. */
  acked(conv, id, error) {
    const c = this.get(conv);
    const msg = c.pending.get(id);
    if (!msg) return null;
    msg.state = error ? 'failed' : 'delivered';
    msg.error = error;
    if (error) c.pending.delete(id);
    return msg;
  }

  /** A summary of reactions. `withMine`: it says which are mine (my own
   *  call's answer, history); else (the coalesced counts) mine are kept. */
  setReactions(conv, seq, reactions, withMine = false) {
    const msg = this.get(conv).bySeq.get(seq);
    if (!msg) return false;
    const next = {};
    for (const [emoji, r] of Object.entries(reactions ?? {})) {
      next[emoji] = { count: r.count, mine: withMine ? Boolean(r.mine) : Boolean(msg.reactions?.[emoji]?.mine) };
    }
    msg.reactions = next;
    return true;
  }

  /** Messages of a conversation in display order: by seq, then ours still
   *  pending in the order they were written. */
  messages(conv) {
    const c = this.get(conv);
    const sent = [...c.bySeq.values()].filter((m) => !m.hidden).sort((a, b) => a.seq - b.seq);
    return sent.concat([...c.pending.values()]);
  }

  setTyping(conv, user, typing, now = Date.now()) {
    let users = this.typing.get(conv);
    if (!users) this.typing.set(conv, (users = new Map()));
    if (typing) users.set(user, now + 6000);
    else users.delete(user);
  }

  typingIn(conv, now = Date.now()) {
    const users = this.typing.get(conv);
    if (!users) return [];
    for (const [u, until] of users) if (until <= now) users.delete(u);
    return [...users.keys()];
  }
}

function lastTs(c) {
  const newest = c.bySeq.get(c.hi);
  const pendingTs = Math.max(0, ...[...c.pending.values()].map((m) => m.ts));
  return Math.max(newest ? newest.ts : 0, pendingTs, c.head > 0 ? 1 : 0);
}
