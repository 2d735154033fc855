// The web chat: login, the conversation list and one open conversation.
//
// Data flow: Connection (MQTT) -> handlers here -> Conversations (state)
// -> view.js (DOM). On every (re)connection `sync` asks for the
// conversation list and fills each conversation from the last seq held, so
// whatever the broker's session replay and history both deliver is shown
// once (Conversations deduplicates by conv and seq).

import { Connection } from './connection.js';
import { looksLikeJwt, StreamLink } from './stream.js';
import { Conversations, directConv } from './conversations.js';
import { $, renderChat, renderList, renderStatus, renderTyping } from './view.js';

const PAGE = 30; // messages per history page when scrolling up
const CATCH_UP_PAGE = 200; // the broker's default history cap
const TYPING_REPEAT_MS = 2500;
const SESSION_KEY = 'chatmq.session';
const USER_ID = /^[A-Za-z0-9_-]{1,64}$/;

let store = null;
let conn = null;
let openConv = null;
const busy = new Set(); // "catchup:conv", "older:conv": one request of each kind at a time
let typingSentAt = 0;
let knownConvs = new Set(); // conversations whose members' presence we asked for

// ---- start-up and login ----------------------------------------------------

async function defaultBrokerUrl() {
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  try {
    const r = await fetch('/v1/client-config');
    const { websocket } = await r.json();
    const port = scheme === 'wss' ? websocket.tls_port : websocket.port;
    if (port) return `${scheme}://${location.hostname}:${port}${websocket.path}`;
  } catch {
    // not served by chatmq: fall back to its default port
  }
  return `${scheme}://${location.hostname || 'localhost'}:8083/mqtt`;
}

function clientIdFor(user) {
  const key = `chatmq.clientId.${user}`;
  let id = localStorage.getItem(key);
  if (!id) {
    const random = crypto.getRandomValues(new Uint32Array(2));
    id = `web-${user}-${[...random].map((n) => n.toString(36)).join('')}`.slice(0, 64);
    localStorage.setItem(key, id);
  }
  return id;
}

async function showLogin(error = '') {
  $('login').hidden = false;
  $('home').hidden = true;
  $('chat').hidden = true;
  document.body.classList.remove('signed-in');
  $('login-error').textContent = error;
  const url = $('login-url');
  if (!url.value) url.value = await defaultBrokerUrl();
}

function onLogin(event) {
  event.preventDefault();
  const form = new FormData(event.target);
  const user = String(form.get('user')).trim();
  const secret = String(form.get('secret'));
  if (!USER_ID.test(user)) {
    $('login-error').textContent = 'A user id is 1 to 64 letters, digits, _ or -.';
    return;
  }
  const session = { user, secret, protocol: Number(form.get('protocol')), url: String(form.get('url')) };
  // The tab keeps the session (a reload stays signed in); closing it forgets the password.
  sessionStorage.setItem(SESSION_KEY, JSON.stringify(session));
  start(session);
}

function logout() {
  conn?.stop();
  conn = null;
  store = null;
  openConv = null;
  sessionStorage.removeItem(SESSION_KEY);
  location.hash = '';
  showLogin();
}

function start(session) {
  store = new Conversations(session.user);
  knownConvs = new Set();
  $('login').hidden = true;
  document.body.classList.add('signed-in');
  $('me').textContent = session.user;
  const options = {
    url: session.url,
    user: session.user,
    secret: session.secret,
    clientId: clientIdFor(session.user),
    protocolVersion: session.protocol === 4 ? 4 : 5,
    on: {
      status: renderStatus,
      connected: () => sync().catch(() => {}),
      message: onMessage,
      acked: onAcked,
      fatal: (reason) => {
        sessionStorage.removeItem(SESSION_KEY);
        showLogin(reason);
      },
      // WebSocket never connected: server-sent events and the HTTP API
      // instead (they take a JWT, not a password), for this page's life.
      unreachable: () => {
        if (!looksLikeJwt(session.secret) || !(conn instanceof Connection)) return;
        conn.stop();
        conn = new StreamLink(options);
        document.body.dataset.transport = 'stream';
        conn.start();
      },
    },
  };
  conn = new Connection(options);
  document.body.dataset.transport = 'websocket';
  route();
  conn.start();
}

// ---- keeping up with the broker ------------------------------------------

/** After each (re)connection: the conversation list, then every
 *  conversation we hold messages of is filled from its last seq. */
async function sync() {
  const { conversations } = await conn.rpc('conversations');
  for (const row of conversations) store.mergeSummary(row);
  noticeContacts();
  const fills = [];
  for (const c of store.byId.values()) {
    if (c.hi > 0) fills.push(catchUp(c.id));
  }
  if (openConv) fills.push(prepare(openConv));
  await Promise.allSettled(fills);
  refresh();
  markRead();
}

/** Fetches what follows the last seq held, page by page, up to the head. */
async function catchUp(convId) {
  const key = `catchup:${convId}`;
  if (busy.has(key)) return;
  busy.add(key);
  try {
    for (;;) {
      const c = store.get(convId);
      const page = await conn.rpc('history', { conv: convId, after: c.hi, limit: CATCH_UP_PAGE });
      addPage(convId, page);
      if (page.messages.length === 0 || store.get(convId).hi >= page.head) break;
    }
  } finally {
    busy.delete(key);
  }
  refresh();
}

/** The newest page of a conversation we hold nothing of yet. */
async function loadLatest(convId) {
  const page = await conn.rpc('history', { conv: convId, limit: PAGE });
  addPage(convId, page);
  store.get(convId).loadedLatest = true;
}

async function loadOlder(convId) {
  const key = `older:${convId}`;
  const c = store.get(convId);
  if (busy.has(key) || c.atStart || c.lo <= 1 || conn?.state !== 'online') return;
  busy.add(key);
  if (convId === openConv) renderChat(store, convId, { loadingOlder: true });
  try {
    const page = await conn.rpc('history', { conv: convId, before: c.lo, limit: PAGE });
    addPage(convId, page);
    if (page.messages.length === 0) c.first = c.lo;
  } finally {
    busy.delete(key);
    if (convId === openConv) renderChat(store, convId);
  }
}

/** Makes an opened conversation ready to read: its newest messages, and
 *  at least one page of them. */
async function prepare(convId) {
  const c = store.get(convId);
  if (c.hi === 0 && !c.loadedLatest) await loadLatest(convId);
  else if (c.hi > 0) await catchUp(convId);
  if (c.bySeq.size < PAGE && !c.atStart && c.lo > 1) await loadOlder(convId);
}

/** Adds a history page: older messages from the newest down, newer ones
 *  from the oldest up, so the held range stays contiguous. */
function addPage(convId, page) {
  const c = store.get(convId);
  c.first = page.first ?? c.first;
  c.head = Math.max(c.head, page.head ?? 0);
  const msgs = [...page.messages].sort((a, b) => a.seq - b.seq);
  const older = msgs.filter((m) => c.lo > 0 && m.seq < c.lo).reverse();
  const newer = msgs.filter((m) => !(c.lo > 0 && m.seq < c.lo));
  for (const m of older.concat(newer)) store.add(m);
}

function onMessage(topic, value) {
  const [kind, ...rest] = topic.split('/');
  const name = rest.join('/');
  if (kind === 'chat') {
    const r = store.add(value);
    if (r.gap) catchUp(value.conv).catch(() => {});
    noticeContacts();
    store.setTyping(value.conv, value.from, false);
    refresh();
    if (value.conv === openConv) markRead();
  } else if (kind === 'typing') {
    if (value.from === store.me) return;
    const typing = value.state?.typing !== false;
    store.setTyping(value.conv, value.from, typing);
    if (value.conv === openConv) {
      renderTyping(store, openConv);
      setTimeout(() => openConv && renderTyping(store, openConv), 6100);
    }
  } else if (kind === 'presence') {
    store.presence.set(name, value.status);
    refresh();
  } else if (kind === 'users') {
    onEvent(value);
  }
}

function onEvent(event) {
  switch (event.type) {
    case 'conversation.created':
    case 'member.added':
    case 'member.removed':
    case 'members': // a large group's joins and leaves of one window
      sync().catch(() => {});
      break;
    case 'read':
      if (event.user !== store.me) {
        const c = store.get(event.conv);
        c.peerRead = Math.max(c.peerRead, event.seq);
        refresh();
      }
      break;
    case 'reads': { // a large group's receipts of one window: {user: seq}
      const c = store.get(event.conv);
      for (const [user, seq] of Object.entries(event.reads ?? {})) {
        if (user !== store.me) c.peerRead = Math.max(c.peerRead, seq);
      }
      refresh();
      break;
    }
    case 'error': {
      // MQTT 3.1.1 has no reason codes: a refused message is reported here.
      const conv = event.topic?.startsWith('chat/') ? event.topic.slice(5) : null;
      if (conv && store.acked(conv, event.id, event.code)) refresh();
      break;
    }
    default:
  }
}

function onAcked(conv, id, error) {
  if (store.acked(conv, id, error)) refresh();
}

/** Contacts are the users we share a conversation with; a new
 *  conversation (one with messages: a direct one starts with its first)
 *  means subscribing to presence again to learn theirs (it is retained). */
function noticeContacts() {
  let grew = false;
  for (const [id, c] of store.byId) {
    if (c.head > 0 && !knownConvs.has(id)) {
      knownConvs.add(id);
      grew = true;
    }
  }
  if (grew) conn?.refreshPresence();
}

function markRead() {
  if (!openConv || document.visibilityState !== 'visible' || conn?.state !== 'online') return;
  const c = store.get(openConv);
  if (c.hi > c.readSent) {
    const seq = c.hi;
    c.readSent = seq;
    c.read = Math.max(c.read, seq);
    conn.rpc('read', { conv: c.id, seq }).catch(() => { c.readSent = 0; }); // retried on the next view
    renderList(store, openConv);
  }
}

function refresh() {
  if (!store) return;
  renderList(store, openConv);
  if (openConv) renderChat(store, openConv);
}

// ---- navigation: #/c/<conv> opens a conversation ---------------------------

function route() {
  if (!store) return;
  const m = /^#\/c\/(.+)$/.exec(location.hash);
  openConv = m ? decodeURIComponent(m[1]) : null;
  const narrow = !matchMedia('(min-width: 48rem)').matches;
  $('chat').hidden = !openConv;
  $('home').hidden = Boolean(openConv) && narrow;
  if (openConv) {
    store.get(openConv);
    renderChat(store, openConv);
    const box = $('messages');
    box.scrollTop = box.scrollHeight;
    if (conn?.state === 'online') prepare(openConv).then(() => { refresh(); markRead(); }).catch(() => {});
    $('composer-input').focus();
  }
  renderList(store, openConv);
}

function open(convId) {
  location.hash = `#/c/${encodeURIComponent(convId)}`;
}

// ---- user actions ----------------------------------------------------------

function onSend(event) {
  event.preventDefault();
  const input = $('composer-input');
  const text = input.value.trim();
  if (!text || !openConv) return;
  input.value = '';
  const id = `${Date.now().toString(36)}-${crypto.getRandomValues(new Uint32Array(1))[0].toString(36)}`;
  store.addPending(openConv, id, { text });
  conn.send(openConv, { id, type: 'text', body: { text } });
  stopTyping();
  refresh();
  const box = $('messages');
  box.scrollTop = box.scrollHeight;
}

function onComposerInput() {
  if (!openConv) return;
  if ($('composer-input').value === '') return stopTyping();
  const now = Date.now();
  if (now - typingSentAt > TYPING_REPEAT_MS) {
    typingSentAt = now;
    conn.typing(openConv, true);
  }
}

function stopTyping() {
  if (typingSentAt && openConv) conn.typing(openConv, false);
  typingSentAt = 0;
}

function onNewDm(event) {
  event.preventDefault();
  const input = $('new-dm-user');
  const peer = input.value.trim();
  if (!USER_ID.test(peer) || peer === store.me) return;
  input.value = '';
  const conv = directConv(store.me, peer);
  store.get(conv);
  open(conv);
}

async function onNewGroup(event) {
  event.preventDefault();
  const form = new FormData(event.target);
  const title = String(form.get('title')).trim();
  const members = String(form.get('members')).split(/[\s,]+/).filter(Boolean);
  try {
    const { conv } = await conn.rpc('conversation.create', { title, members });
    store.get(conv).title = title;
    event.target.reset();
    $('new-group-error').textContent = '';
    open(conv);
  } catch (e) {
    $('new-group-error').textContent = e.message;
  }
}

function wire() {
  $('login-form').addEventListener('submit', onLogin);
  $('logout').addEventListener('click', logout);
  $('new-dm').addEventListener('submit', onNewDm);
  $('new-group').addEventListener('submit', onNewGroup);
  $('composer').addEventListener('submit', onSend);
  $('composer-input').addEventListener('input', onComposerInput);
  $('composer-input').addEventListener('blur', stopTyping);
  $('chat-back').addEventListener('click', () => { location.hash = ''; });
  $('conv-list').addEventListener('click', (e) => {
    const li = e.target.closest('[data-conv]');
    if (li) open(li.dataset.conv);
  });
  $('messages').addEventListener('scroll', () => {
    if (openConv && $('messages').scrollTop < 40) loadOlder(openConv).catch(() => {});
  });
  window.addEventListener('hashchange', route);
  document.addEventListener('visibilitychange', markRead);
}

wire();
if ('serviceWorker' in navigator) navigator.serviceWorker.register('sw.js').catch(() => {});
const saved = JSON.parse(sessionStorage.getItem(SESSION_KEY) || 'null');
if (saved) start(saved);
else showLogin();
