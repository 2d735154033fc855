// The outbox: chat messages written but not yet acknowledged by the
// server (acknowledged = on its disk, with a seq). Kept in IndexedDB when
// the environment has it, so a reload or a crash of the page loses no
// message: the next ChatClient on the same storage sends them again with
// the same envelope id, and the server's idempotency (one message per
// conversation, sender and id) gives them the seq they got the first time,
// if they got one. Without IndexedDB (or with `storage: false`) the outbox
// lives in memory only.
//
// One object store, `outbox`, keyed by [user, conv, id], with the order of
// writing kept in `n` (resent oldest first).

const STORE = 'outbox';

/** @typedef {import('./index.js').OutboxItem} OutboxItem */

/** A memory outbox: the same interface, nothing survives the page. */
export class MemoryOutboxStore {
  constructor() {
    /** @type {Map<string, OutboxItem>} */
    this.items = new Map();
  }
  /** @param {string} user @returns {Promise<OutboxItem[]>} */
  async load(user) {
    return [...this.items.values()].filter((i) => i.user === user).sort((a, b) => a.n - b.n);
  }
  /** @param {OutboxItem} item */
  async put(item) {
    this.items.set(JSON.stringify([item.user, item.conv, item.envelope.id]), item);
  }
  /** @param {string} user @param {string} conv @param {string} id */
  async delete(user, conv, id) {
    this.items.delete(JSON.stringify([user, conv, id]));
  }
  close() {}
}

/** The IndexedDB outbox. */
export class IndexedDbOutboxStore {
  /**
   * @param {IDBFactory} factory `indexedDB` (the browser's, or fake-indexeddb's in Node)
   * @param {string} name the database name
   */
  constructor(factory, name) {
    this.db = new Promise((resolve, reject) => {
      const req = factory.open(name, 1);
      req.onupgradeneeded = () => {
        const store = req.result.createObjectStore(STORE, { keyPath: ['user', 'conv', 'envelope.id'] });
        store.createIndex('user', 'user');
      };
      req.onsuccess = () => resolve(req.result);
      req.onerror = () => reject(req.error);
      req.onblocked = () => reject(new Error(`IndexedDB ${name} is blocked by another tab's older version`));
    });
  }

  /**
   * @template T
   * @param {IDBTransactionMode} mode
   * @param {(store: IDBObjectStore) => IDBRequest<T>} fn
   * @returns {Promise<T>}
   */
  async run(mode, fn) {
    const db = await this.db;
    return new Promise((resolve, reject) => {
      const tx = db.transaction(STORE, mode);
      const req = fn(tx.objectStore(STORE));
      // Resolved when the transaction is committed, not when the request
      // succeeds: a put is durable only then.
      tx.oncomplete = () => resolve(req.result);
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error ?? new Error('IndexedDB transaction aborted'));
    });
  }

  /** @param {string} user @returns {Promise<OutboxItem[]>} */
  async load(user) {
    const items = await this.run('readonly', (s) => s.index('user').getAll(user));
    return items.sort((a, b) => a.n - b.n);
  }

  /** @param {OutboxItem} item */
  async put(item) {
    await this.run('readwrite', (s) => s.put(item));
  }

  /** @param {string} user @param {string} conv @param {string} id */
  async delete(user, conv, id) {
    await this.run('readwrite', (s) => s.delete([user, conv, id]));
  }

  close() {
    this.db.then((db) => db.close(), () => {});
  }
}

/**
 * The outbox store for these options: IndexedDB if there is one (the
 * `indexedDB` option, else the global), memory otherwise.
 * @param {{storage?: false | {indexedDB?: IDBFactory, name?: string}}} o
 */
export function openOutboxStore(o) {
  if (o.storage === false) return new MemoryOutboxStore();
  const factory = o.storage?.indexedDB ?? globalThis.indexedDB;
  if (!factory) return new MemoryOutboxStore();
  return new IndexedDbOutboxStore(factory, o.storage?.name ?? 'chatmq-sdk');
}
