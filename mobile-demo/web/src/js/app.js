// The web chat: login, the conversation list and one open conversation,
// on chatmq's JavaScript SDK (../sdk: the connection, its fallback,
// resume, deduplication and the outbox live there).
//
// Data flow: ChatClient events -> handlers here -> Conversations (state)
// -> view.js (DOM). On each (re)connection the page asks for the
// conversation list (unread counts, new conversations); the messages
// missed are the SDK's business: a present session replays them, a new
// one is filled from each conversation's last seq, and each arrives once.

import { ChatClient, looksLikeJwt } from '../sdk/index.js';
import { Conversations, directConv } from './conversations.js';
import { $, REACTION, renderChat, renderList, renderStatus, renderTyping } from './view.js';

const PAGE = 30; // messages per history page when scrolling up
const TYPING_REPEAT_MS = 2500;
const SESSION_KEY = 'chatmq.session';
const USER_ID = /^[A-Za-z0-9_-]{1,64}$/;

let store = null;
/** @type {ChatClient | null} */
let conn = null;
let openConv = null;
let editing = null; // {conv, seq} while the composer edits a message
const busy = new Set(); // "older:conv": one request of each kind at a time
let typingSentAt = 0;
let knownConvs = new Set(); // conversations whose members' presence we asked for
const imageUrls = new Map(); // attachment id -> signed link ('' while asked)

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
  conn = new ChatClient({
    url: session.url,
    user: session.user,
    secret: session.secret,
    clientId: clientIdFor(session.user),
    protocolVersion: session.protocol === 4 ? 4 : 5,
    // WebSocket first; where it never connects, server-sent events and
    // the HTTP API (they take a JWT, not a password).
    transport: 'auto',
    storage: { name: `chatmq-web` },
  });
  const c = conn;
  c.on('status', (state, detail) => renderStatus(state === 'stopped' ? 'idle' : state, detail));
  c.on('transport', (t) => { document.body.dataset.transport = t; });
  c.on('connected', () => sync().catch(() => {}));
  c.on('message', onChat);
  c.on('typing', onTyping);
  c.on('presence', (p) => { store.presence.set(p.user, p.status); refresh(); });
  c.on('read', (r) => {
    if (r.user === store.me) return;
    const conv = store.get(r.conv);
    conv.peerRead = Math.max(conv.peerRead, r.seq);
    refresh();
  });
  c.on('reactions', (e) => {
    let changed = false;
    for (const m of e.messages) changed = store.setReactions(e.conv, m.seq, m.reactions) || changed;
    if (changed) refresh();
  });
  c.on('acked', (a) => { if (store.acked(a.conv, a.id, a.error)) refresh(); });
  c.on('event', (event) => {
    if (['conversation.created', 'member.added', 'member.removed', 'members'].includes(event.type)) sync().catch(() => {});
  });
  // The outbox could not be written (quota, no IndexedDB): still sent, but not kept across a reload.
  c.on('error', (e) => showError(`Not saved on this device: ${e?.message ?? e}`));
  c.on('fatal', (reason) => {
    sessionStorage.removeItem(SESSION_KEY);
    showLogin(reason);
  });
  document.body.dataset.transport = 'websocket';
  route();
  c.start().then(() => {
    // What the outbox kept from before a reload: shown pending, sent by the SDK.
    for (const p of c.pending()) store.addPending(p.conv, p.envelope.id, p.envelope.body);
    refresh();
  });
}

// ---- keeping up with the broker ------------------------------------------

/** After each (re)connection: the conversation list (heads, unread
 *  counts, new conversations), and the open conversation made ready. No
 *  history per conversation: the SDK resumes what was missed. */
async function sync() {
  const { conversations } = await conn.conversations();
  for (const row of conversations) store.mergeSummary(row);
  noticeContacts();
  if (openConv) await prepare(openConv).catch(() => {});
  refresh();
  markRead();
}

/** The newest page of a conversation we hold nothing of yet. */
async function loadLatest(convId) {
  const page = await conn.history(convId, { limit: PAGE });
  addPage(convId, page);
  store.get(convId).loadedLatest = true;
}

async function loadOlder(convId) {
  const key = `older:${convId}`;
  const c = store.get(convId);
  if (busy.has(key) || c.atStart || c.lo <= 1 || conn?.state !== 'online') return;
  busy.add(key);
  if (convId === openConv) draw(convId, { loadingOlder: true });
  try {
    const page = await conn.history(convId, { before: c.lo, limit: PAGE });
    addPage(convId, page);
    if (page.messages.length === 0) c.first = c.lo;
  } finally {
    busy.delete(key);
    if (convId === openConv) draw(convId);
  }
}

/** Makes an opened conversation ready to read: its newest messages, and
 *  at least one page of them. */
async function prepare(convId) {
  const c = store.get(convId);
  if (c.hi === 0 && !c.loadedLatest) await loadLatest(convId);
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
  for (const m of older.concat(newer)) {
    const r = store.add(m);
    if (r.added && m.reactions) store.setReactions(convId, m.seq, m.reactions, true);
  }
}

/** A sequenced message from the SDK: once, in order, per conversation. */
function onChat(m) {
  store.add(m);
  noticeContacts();
  store.setTyping(m.conv, m.from, false);
  refresh();
  if (m.conv === openConv) markRead();
}

function onTyping(t) {
  store.setTyping(t.conv, t.from, t.typing);
  if (t.conv === openConv) {
    renderTyping(store, openConv);
    setTimeout(() => openConv && renderTyping(store, openConv), 6100);
  }
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
    conn.read(c.id, seq).catch(() => { c.readSent = 0; }); // retried on the next view
    renderList(store, openConv);
  }
}

/** The signed link of an image attachment: asked once, drawn when known. */
function imageUrl(id) {
  const known = imageUrls.get(id);
  if (known !== undefined) return known || null;
  if (!conn || !looksLikeJwt(conn.o.secret)) return null;
  imageUrls.set(id, '');
  conn.attachmentLink(id).then(
    (link) => { imageUrls.set(id, link.url); refresh(); },
    () => { imageUrls.delete(id); },
  );
  return null;
}

function draw(convId, o = {}) {
  renderChat(store, convId, { imageUrl, editing, ...o });
}

function refresh() {
  if (!store) return;
  renderList(store, openConv);
  if (openConv) draw(openConv);
}

// ---- navigation: #/c/<conv> opens a conversation ---------------------------

function route() {
  if (!store) return;
  const m = /^#\/c\/(.+)$/.exec(location.hash);
  openConv = m ? decodeURIComponent(m[1]) : null;
  stopEditing();
  const narrow = !matchMedia('(min-width: 48rem)').matches;
  $('chat').hidden = !openConv;
  $('home').hidden = Boolean(openConv) && narrow;
  if (openConv) {
    store.get(openConv);
    draw(openConv);
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
  if (editing) {
    const { conv, seq } = editing;
    stopEditing();
    conn.edit(conv, seq, { text }).catch((e) => showError(`Not edited: ${e.message}`));
    return;
  }
  sendBody(openConv, { text });
  stopTyping();
}

/** Shows a message of ours at once (pending) and hands it to the SDK's outbox. */
function sendBody(conv, body) {
  const id = `${Date.now().toString(36)}-${crypto.getRandomValues(new Uint32Array(1))[0].toString(36)}`;
  store.addPending(conv, id, body);
  conn.send(conv, body, { id }).catch((e) => showError(`Not sent: ${e.message}`));
  refresh();
  const box = $('messages');
  box.scrollTop = box.scrollHeight;
}

function showError(text) {
  $('composer-error').textContent = text;
}

/** An image picked in the composer: uploaded (the HTTP API: a JWT
 *  login), then sent as a message referencing it. */
async function onFile(event) {
  const input = event.target;
  const file = input.files?.[0];
  input.value = '';
  if (!file || !openConv) return;
  const conv = openConv;
  if (!looksLikeJwt(conn.o.secret)) return showError('Images need a login with a token (the HTTP API takes no passwords).');
  try {
    const up = await conn.upload(conv, file);
    showError('');
    sendBody(conv, { text: '', attachments: [{ id: up.id, name: file.name, content_type: up.content_type }] });
  } catch (e) {
    showError(`Not uploaded: ${e.message}`);
  }
}

/** The buttons on a message: react (toggle 👍), edit, delete. */
function onMessageAction(event) {
  const button = event.target.closest('[data-action]');
  const li = event.target.closest('[data-testid="message"]');
  if (!button || !li || !openConv || !li.dataset.seq) return;
  const conv = openConv;
  const seq = Number(li.dataset.seq);
  const msg = store.get(conv).bySeq.get(seq);
  if (!msg) return;
  switch (button.dataset.action) {
    case 'message-react': {
      const call = msg.reactions?.[REACTION]?.mine ? conn.unreact(conv, seq, REACTION) : conn.react(conv, seq, REACTION);
      call.then((r) => { store.setReactions(conv, seq, r.reactions, true); refresh(); }, (e) => showError(e.message));
      break;
    }
    case 'message-edit':
      editing = { conv, seq };
      $('editing').hidden = false;
      $('composer-input').value = typeof msg.body?.text === 'string' ? msg.body.text : '';
      $('composer-input').focus();
      draw(conv);
      break;
    case 'message-delete':
      conn.deleteMessage(conv, seq).catch((e) => showError(`Not deleted: ${e.message}`));
      break;
    default:
  }
}

function stopEditing() {
  if (!editing) return;
  editing = null;
  $('editing').hidden = true;
  $('composer-input').value = '';
  if (openConv) draw(openConv);
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
    const { conv } = await conn.createConversation(title, members);
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
  $('composer-file').addEventListener('change', onFile);
  $('edit-cancel').addEventListener('click', stopEditing);
  $('message-list').addEventListener('click', onMessageAction);
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
