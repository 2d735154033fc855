// A small typed-by-name event emitter (no dependency): `on` returns the
// function that removes the listener. A listener that throws does not stop
// the others; the error is reported on `console.error`.

export class Emitter {
  constructor() {
    /** @type {Map<string, Set<Function>>} */
    this.listeners = new Map();
  }

  /**
   * @param {string} type
   * @param {Function} fn
   * @returns {() => void} removes the listener
   */
  on(type, fn) {
    let set = this.listeners.get(type);
    if (!set) this.listeners.set(type, (set = new Set()));
    set.add(fn);
    return () => this.off(type, fn);
  }

  /** @param {string} type @param {Function} fn */
  off(type, fn) {
    this.listeners.get(type)?.delete(fn);
  }

  /** @param {string} type @param {...unknown} args */
  emit(type, ...args) {
    for (const fn of [...(this.listeners.get(type) ?? [])]) {
      try {
        fn(...args);
      } catch (e) {
        console.error(`chatmq sdk: a "${type}" listener threw`, e);
      }
    }
  }
}
