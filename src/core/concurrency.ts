/** Run `work` over `items` with at most `limit` in flight; rejects with the first failure. */
export async function runBounded<T, R>(
  items: readonly T[],
  limit: number,
  work: (item: T, index: number) => Promise<R>,
): Promise<R[]> {
  const results = new Array<R>(items.length);
  let next = 0;
  let failed: unknown;
  const worker = async (): Promise<void> => {
    while (failed === undefined) {
      const index = next++;
      if (index >= items.length) return;
      try {
        results[index] = await work(items[index] as T, index);
      } catch (error) {
        failed ??= error;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(limit, items.length)) }, worker));
  if (failed !== undefined) throw failed;
  return results;
}

/**
 * Coalesces calls per key: a call made while a run for its key is in progress shares the one run queued after it,
 * which starts only once the current one ends. So every caller waits for a run that started after it called (it
 * sees everything the caller wrote before), and at most two runs per key exist at a time, however many callers.
 */
export class TrailingRuns {
  private readonly byKey = new Map<string, { running: Promise<void>; queued?: Promise<void> }>();

  run(key: string, work: () => Promise<void>): Promise<void> {
    const state = this.byKey.get(key);
    if (!state) return this.startNow(key, work);
    if (!state.queued) {
      state.queued = state.running.then(
        () => this.startNow(key, work),
        () => this.startNow(key, work),
      );
    }
    return state.queued;
  }

  private startNow(key: string, work: () => Promise<void>): Promise<void> {
    const running = Promise.resolve().then(work);
    this.byKey.set(key, { running });
    const finished = (): void => {
      const state = this.byKey.get(key);
      if (state?.running === running && !state.queued) this.byKey.delete(key);
    };
    running.then(finished, finished);
    return running;
  }
}

/** At most `limit` holders at a time; the others wait in arrival order. `maxInUse` is the most ever held at once. */
export class Semaphore {
  private inUse = 0;
  private readonly waiting: (() => void)[] = [];
  maxInUse = 0;

  constructor(private readonly limit: number) {}

  async run<T>(work: () => Promise<T>): Promise<T> {
    if (this.inUse >= this.limit) await new Promise<void>((resolve) => this.waiting.push(resolve));
    else this.inUse++;
    this.maxInUse = Math.max(this.maxInUse, this.inUse);
    try {
      return await work();
    } finally {
      const next = this.waiting.shift();
      // The slot passes straight to the next waiter, so a new arrival never jumps the queue.
      if (next) next();
      else this.inUse--;
    }
  }
}
