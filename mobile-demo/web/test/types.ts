// What an app written in TypeScript does with the SDK: `npm run
// typecheck` (tsc --strict) must accept it, so the declarations in
// src/sdk/index.d.ts cover every call and event an app uses.

import { ChatClient, directConv, type Message } from '../src/sdk/index.js';

export async function app(): Promise<void> {
  const client = new ChatClient({ url: 'ws://localhost:8083/mqtt', user: 'alice', secret: 'token', clientId: 'web-alice-1', httpBase: '' });
  const shown: Message[] = [];
  client.on('message', (m) => { shown.push(m); });
  client.on('status', (state, wait) => console.log(state, wait ?? 0));
  client.on('connected', ({ sessionPresent, transport }) => console.log(sessionPresent, transport));
  client.on('edit', (e) => console.log(e.conv, e.seq, e.body));
  client.on('delete', (e) => console.log(e.conv, e.seq));
  client.on('reactions', (e) => e.messages.forEach((m) => console.log(m.seq, m.reactions['👍']?.count)));
  client.on('presence', (p) => console.log(p.user, p.status));
  client.on('typing', (t) => console.log(t.from, t.typing));
  client.on('read', (r) => console.log(r.user, r.seq));
  client.on('acked', (a) => console.log(a.id, a.error));
  const off = client.on('fatal', (reason) => console.log(reason));
  off();
  await client.start();
  const conv = directConv('alice', 'bob');
  const id: string = await client.send(conv, { text: 'hi' });
  const page = await client.history(conv, { before: 10, limit: 30 });
  const first: number = page.first;
  const { conversations } = await client.conversations();
  conversations.forEach((c) => console.log(c.conv, c.unread));
  const { event_seq } = await client.edit(conv, 1, { text: 'hi!' });
  await client.deleteMessage(conv, 1);
  const { reactions } = await client.react(conv, 2, '👍');
  console.log(id, first, event_seq, reactions['👍']?.mine, client.pending(conv).length, client.lastSeq(conv));
  const up = await client.upload(conv, new Blob([new Uint8Array([1])], { type: 'image/png' }));
  await client.send(conv, { text: 'look', attachments: [{ id: up.id, name: 'cat.png' }] });
  const link = await client.attachmentLink(up.id);
  console.log(link.url, client.stats.subscribes);
  client.stop();
}
