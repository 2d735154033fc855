// Types of chatmq's JavaScript client SDK (hand-written beside the
// JavaScript; `npm run typecheck` checks them and test/types.ts, an app's
// use of every call, with tsc --strict, and the JavaScript's JSDoc, which
// refers to these types, with checkJs).

/** A delivered chat message (docs/DESIGN.md "Envelope"). */
export interface Message {
  conv: string;
  seq: number;
  id: string;
  from: string;
  /** Unix milliseconds, the server's. */
  ts: number;
  /** "text" unless the sender said otherwise; "message.edit" / "message.delete" are the server's change records. */
  type: string;
  body: unknown;
  /** A change record's target seq. */
  target?: number;
  /** In history: the message was edited (the latest body is in `body`). */
  edited?: { seq: number; by: string; ts: number };
  edits?: number[];
  /** In history: the message was deleted (`body` is null). */
  deleted?: { seq: number; by: string; ts: number } | true;
  /** In history: reactions with the caller's own. */
  reactions?: Reactions;
}

export type Reactions = Record<string, { count: number; mine?: boolean }>;

/** A body referencing uploaded files. */
export interface AttachmentRef {
  id: string;
  [key: string]: unknown;
}

export interface HistoryPage {
  messages: Message[];
  /** The newest seq of the conversation. */
  head: number;
  /** The oldest seq the server still has. */
  first: number;
  epoch?: unknown;
}

export interface ConversationSummary {
  conv: string;
  title: string;
  head: number;
  read: number;
  unread: number;
  role?: string;
  muted?: boolean;
}

export interface OutboxItem {
  user: string;
  conv: string;
  envelope: { id: string; type: string; body: unknown };
  /** Order of writing. */
  n: number;
  /** Unix milliseconds when written. */
  at: number;
}

export interface OutboxStore {
  load(user: string): Promise<OutboxItem[]>;
  put(item: OutboxItem): Promise<void>;
  delete(user: string, conv: string, id: string): Promise<void>;
  close(): void;
}

export class MemoryOutboxStore implements OutboxStore {
  load(user: string): Promise<OutboxItem[]>;
  put(item: OutboxItem): Promise<void>;
  delete(user: string, conv: string, id: string): Promise<void>;
  close(): void;
}

export class IndexedDbOutboxStore implements OutboxStore {
  constructor(factory: IDBFactory, name: string);
  load(user: string): Promise<OutboxItem[]>;
  put(item: OutboxItem): Promise<void>;
  delete(user: string, conv: string, id: string): Promise<void>;
  close(): void;
}

export interface ChatClientOptions {
  /** ws:// or wss:// URL of MQTT over WebSocket, e.g. ws://host:8083/mqtt. */
  url: string;
  /** User id (the MQTT user name). */
  user: string;
  /** A password or a JWT. The HTTP API (fallback, attachments) takes JWTs only. */
  secret: string;
  /** Stable per device and user: the server keeps the session under it. Default: random. */
  clientId?: string;
  /** MQTT 5 (default) or 3.1.1. */
  protocolVersion?: 4 | 5;
  /** "auto" (default): WebSocket, and the SSE fallback if it never connects and the secret is a JWT. */
  transport?: 'auto' | 'websocket' | 'stream';
  /** Origin of the HTTP API, e.g. http://host:8080 ('' for the page's own). */
  httpBase?: string;
  /** Where the outbox is kept: IndexedDB (default, the global `indexedDB`), or false for memory. */
  storage?: false | { indexedDB?: IDBFactory; name?: string };
  /** RPC and HTTP call timeout, default 10 s. */
  rpcTimeoutMs?: number;
  /** Reconnect backoff: equal jitter, default 500 ms doubling up to 30 s. */
  backoff?: { baseMs?: number; capMs?: number };
  /** The jitter's random source, default Math.random. */
  random?: () => number;
  /** An EventSource implementation where there is no global one. */
  EventSource?: typeof EventSource;
  /** A fetch implementation where there is no global one. */
  fetch?: typeof fetch;
}

export type ConnectionState = 'idle' | 'connecting' | 'online' | 'waiting' | 'offline' | 'stopped';

export interface ChatClientEvents {
  /** Connection state; `detail` is the wait in ms for "waiting". */
  status: (state: ConnectionState, detail?: number) => void;
  connected: (info: { sessionPresent: boolean; transport: 'websocket' | 'stream' }) => void;
  /** WebSocket was given up for the SSE fallback. */
  transport: (transport: 'stream') => void;
  /** Each sequenced message once per (conv, seq), in seq order per conversation. */
  message: (m: Message) => void;
  edit: (e: { conv: string; seq: number; eventSeq: number; by: string; body: unknown; ts: number }) => void;
  delete: (e: { conv: string; seq: number; eventSeq: number; by: string; ts: number }) => void;
  /** Coalesced reaction summaries (counts only; `mine` comes from react/unreact and history). */
  reactions: (e: { conv: string; messages: { seq: number; reactions: Reactions }[] }) => void;
  presence: (p: { user: string; status: 'online' | 'offline'; ts: number }) => void;
  typing: (t: { conv: string; from: string; typing: boolean }) => void;
  /** A read receipt of another member (a large group's "reads" one per entry). */
  read: (r: { conv: string; user: string; seq: number }) => void;
  /** An outbox message was stored by the server (error null) or refused. */
  acked: (a: { conv: string; id: string; error: string | null; seq?: number }) => void;
  /** Every event of users/{me}/events but RPC replies, as it came. */
  event: (e: { type: string; [key: string]: unknown }) => void;
  /** A delivery on a topic outside the chat session's (ACL topics). */
  publish: (topic: string, value: unknown) => void;
  /** Retrying cannot help (bad credentials, a client id of another user): the client stopped. */
  fatal: (reason: string) => void;
  /** A storage failure. */
  error: (e: unknown) => void;
}

export class ChatClient {
  constructor(o: ChatClientOptions);
  readonly user: string;
  readonly state: ConnectionState;
  readonly transport: 'websocket' | 'stream';
  readonly stats: { connects: number; sessionPresent: number; subscribes: number; resent: number; fills: number };

  on<K extends keyof ChatClientEvents>(type: K, fn: ChatClientEvents[K]): () => void;
  off<K extends keyof ChatClientEvents>(type: K, fn: ChatClientEvents[K]): void;

  start(): Promise<void>;
  stop(): void;
  connectNow(): void;
  goOffline(): void;

  lastSeq(conv: string): number;
  resumeFrom(conv: string, seq: number): void;

  send(conv: string, body: unknown, o?: { id?: string; type?: string }): Promise<string>;
  pending(conv?: string): OutboxItem[];

  rpc<T = unknown>(method: string, params?: Record<string, unknown>): Promise<T>;
  conversations(): Promise<{ conversations: ConversationSummary[] }>;
  history(conv: string, q?: { after?: number; before?: number; limit?: number }): Promise<HistoryPage>;
  createConversation(title: string, members: string[]): Promise<{ conv: string }>;
  read(conv: string, seq: number): Promise<unknown>;
  edit(conv: string, seq: number, body: unknown): Promise<{ conv: string; seq: number; event_seq: number }>;
  deleteMessage(conv: string, seq: number): Promise<{ conv: string; seq: number; event_seq: number }>;
  react(conv: string, seq: number, emoji: string): Promise<{ conv: string; seq: number; reactions: Reactions }>;
  unreact(conv: string, seq: number, emoji: string): Promise<{ conv: string; seq: number; reactions: Reactions }>;
  occupancy(conv: string): Promise<{ conv: string; members: number; connected: number }>;
  typing(conv: string, typing: boolean): void;
  refreshPresence(): void;
  upload(conv: string, file: Blob | ArrayBuffer | Uint8Array, contentType?: string): Promise<{ id: string; size: number; content_type: string; url: string }>;
  attachmentLink(id: string): Promise<{ token: string; url: string; expires: number }>;
}

export function backoffDelay(attempt: number, random?: () => number, o?: { baseMs?: number; capMs?: number }): number;
export const BASE_MS: number;
export const CAP_MS: number;
export function looksLikeJwt(secret: string): boolean;
export function randomId(): string;
export function directConv(a: string, b: string): string;
export function peerOf(conv: string, me: string): string | null;
