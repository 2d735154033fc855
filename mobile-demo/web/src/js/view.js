// Rendering: turns the state in conversations.js into DOM. Elements carry
// stable data-testid attributes (the browser test reads them) and a
// message is one <li> keyed by sender and envelope id, so a pending
// message becomes the delivered one in place and is never shown twice.

import { peerOf } from './conversations.js';

export const $ = (testid, root = document) => root.querySelector(`[data-testid="${testid}"]`);

const STATUS_TEXT = {
  idle: '',
  connecting: 'connecting…',
  online: 'online',
  offline: 'offline',
};

export function renderStatus(state, detail) {
  const text = state === 'waiting' ? `reconnecting in ${Math.ceil(detail / 1000)} s` : STATUS_TEXT[state] ?? state;
  for (const id of ['conn-status', 'chat-conn-status']) {
    const el = $(id);
    el.textContent = text;
    el.dataset.state = state;
  }
}

export function titleOf(conv, me) {
  const peer = peerOf(conv.id, me);
  return peer ?? (conv.title || conv.id);
}

function presenceDot(el, store, conv) {
  const peer = peerOf(conv.id, store.me);
  el.classList.toggle('group', !peer);
  const status = peer ? store.presence.get(peer) : undefined;
  if (status) el.dataset.status = status;
  else delete el.dataset.status;
}

export function bodyText(body) {
  if (body === null || body === undefined) return 'message deleted';
  if (typeof body === 'string') return body;
  if (body && typeof body.text === 'string' && body.text) return body.text;
  if (Array.isArray(body?.attachments) && body.attachments.length > 0) return '📎 image';
  return JSON.stringify(body);
}

/** The images a body references: [{id, name}]. */
function imagesOf(body) {
  const list = Array.isArray(body?.attachments) ? body.attachments : [];
  return list.filter((a) => a && typeof a.id === 'string' && /^[0-9a-f]{64}$/.test(a.id));
}

export const REACTION = '👍';

export function renderList(store, openConv) {
  const list = $('conv-list');
  const items = new Map([...list.children].map((li) => [li.dataset.conv, li]));
  const convs = store.list();
  for (const c of convs) {
    let li = items.get(c.id);
    if (!li) {
      li = document.createElement('li');
      li.dataset.testid = 'conv-item';
      li.dataset.conv = c.id;
      li.innerHTML = '<span class="dot" data-testid="presence"></span><div class="text"><div class="name" data-testid="conv-name"></div><div class="preview" data-testid="conv-preview"></div></div><span class="unread" data-testid="unread"></span>';
    }
    items.delete(c.id);
    list.appendChild(li); // moves it into list order
    li.classList.toggle('open', c.id === openConv);
    $('conv-name', li).textContent = titleOf(c, store.me);
    const newest = store.messages(c.id).at(-1);
    $('conv-preview', li).textContent = newest ? `${newest.from === store.me ? 'You' : newest.from}: ${bodyText(newest.body)}` : '';
    const unread = $('unread', li);
    unread.textContent = String(c.unread);
    unread.dataset.count = String(c.unread);
    presenceDot($('presence', li), store, c);
  }
  for (const stale of items.values()) stale.remove();
  $('conv-empty').hidden = convs.length > 0;
}

/** Renders the open conversation. Returns nothing; keeps the reader's
 *  place when older messages are added above, and follows the bottom when
 *  the reader was there. */
export function renderChat(store, convId, { loadingOlder = false, imageUrl = () => null, editing = null } = {}) {
  const c = store.get(convId);
  $('chat-title').textContent = titleOf(c, store.me);
  presenceDot($('chat-presence'), store, c);

  const box = $('messages');
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  const heightBefore = box.scrollHeight;
  const list = $('message-list');
  if (list.dataset.conv !== convId) {
    list.replaceChildren();
    list.dataset.conv = convId;
  }
  const nodes = new Map([...list.children].map((li) => [li.dataset.key, li]));
  const firstBefore = list.firstElementChild;
  let previous = null;
  for (const m of store.messages(convId)) {
    const key = `${m.from}/${m.id}`;
    let li = nodes.get(key);
    if (!li) {
      li = document.createElement('li');
      li.className = 'message';
      li.dataset.testid = 'message';
      li.dataset.key = key;
      li.dataset.id = m.id;
      li.dataset.from = m.from;
      li.innerHTML = '<div class="from"></div><div class="body" data-testid="message-body"></div><div class="images" data-testid="message-images"></div><div class="reactions" data-testid="reactions"></div><div class="meta"><span class="time"></span><span class="actions"></span></div>';
      li.classList.toggle('mine', m.from === store.me);
      li.querySelector('.from').textContent = m.from === store.me || peerOf(convId, store.me) ? '' : m.from;
    }
    nodes.delete(key);
    $('message-body', li).textContent = bodyText(m.body);
    li.classList.toggle('deleted', Boolean(m.deleted));
    li.dataset.edited = m.edited ? 'true' : 'false';
    li.dataset.deleted = m.deleted ? 'true' : 'false';
    li.classList.toggle('editing', Boolean(editing && editing.seq === m.seq));
    renderImages($('message-images', li), m.deleted ? [] : imagesOf(m.body), imageUrl);
    renderReactions($('reactions', li), m);
    renderActions(li.querySelector('.actions'), store, m);
    if (m.seq) li.dataset.seq = String(m.seq);
    const state = m.from === store.me && m.state === 'delivered' && m.seq && c.peerRead >= m.seq ? 'read' : m.state;
    li.dataset.state = state;
    li.querySelector('.time').textContent = `${m.edited ? 'edited · ' : ''}${new Date(m.ts).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })}`;
    const want = previous ? previous.nextElementSibling : list.firstElementChild;
    if (want !== li) list.insertBefore(li, want);
    previous = li;
  }
  for (const stale of nodes.values()) stale.remove();

  const status = $('history-status');
  status.textContent = loadingOlder ? 'loading older messages…' : c.atStart || (c.head === 0 && c.loadedLatest) ? 'start of the conversation' : '';
  status.dataset.state = loadingOlder ? 'loading' : c.atStart || c.head === 0 ? 'start' : 'more';

  if (firstBefore && list.firstElementChild !== firstBefore && !atBottom) {
    box.scrollTop += box.scrollHeight - heightBefore; // older messages went above
  } else if (atBottom) {
    box.scrollTop = box.scrollHeight;
  }
  renderTyping(store, convId);
}

export function renderTyping(store, convId) {
  const who = store.typingIn(convId).filter((u) => u !== store.me);
  const el = $('typing');
  el.textContent = who.length === 0 ? '' : `${who.join(', ')} ${who.length === 1 ? 'is' : 'are'} typing…`;
}

/** One <img> per referenced image, with a signed link once known. */
function renderImages(box, images, imageUrl) {
  const want = images.map((a) => a.id).join(',');
  if (box.dataset.ids !== want) {
    box.replaceChildren(
      ...images.map((a) => {
        const img = document.createElement('img');
        img.dataset.testid = 'attachment-image';
        img.dataset.id = a.id;
        img.alt = typeof a.name === 'string' ? a.name : 'image';
        return img;
      }),
    );
    box.dataset.ids = want;
  }
  for (const img of box.querySelectorAll('img')) {
    if (img.getAttribute('src')) continue;
    const url = imageUrl(img.dataset.id);
    if (url) img.src = url;
  }
}

/** The aggregated reactions: one chip per emoji with its count. */
function renderReactions(box, m) {
  const entries = Object.entries(m.reactions ?? {}).filter(([, r]) => r.count > 0);
  const want = JSON.stringify(entries);
  if (box.dataset.shown === want) return;
  box.dataset.shown = want;
  box.replaceChildren(
    ...entries.map(([emoji, r]) => {
      const chip = document.createElement('span');
      chip.className = 'reaction';
      chip.classList.toggle('mine', Boolean(r.mine));
      chip.dataset.testid = 'reaction';
      chip.dataset.emoji = emoji;
      chip.dataset.count = String(r.count);
      chip.dataset.mine = r.mine ? 'true' : 'false';
      chip.textContent = `${emoji} ${r.count}`;
      return chip;
    }),
  );
}

/** Edit and delete on my own messages, a reaction toggle on everyone's
 *  (sequenced, not deleted ones only). */
function renderActions(box, store, m) {
  const mine = m.from === store.me;
  const want = !m.seq || m.deleted ? '' : mine ? 'mine' : 'theirs';
  if (box.dataset.kind === want) return;
  box.dataset.kind = want;
  const button = (testid, label, title) => {
    const b = document.createElement('button');
    b.type = 'button';
    b.className = 'link';
    b.dataset.testid = testid;
    b.dataset.action = testid;
    b.title = title;
    b.textContent = label;
    return b;
  };
  const buttons = [];
  if (want) buttons.push(button('message-react', REACTION, 'React'));
  if (want === 'mine' && !m.body?.attachments) buttons.push(button('message-edit', 'edit', 'Edit'));
  if (want === 'mine') buttons.push(button('message-delete', 'delete', 'Delete'));
  box.replaceChildren(...buttons);
}
