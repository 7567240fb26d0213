import {
  JSON_CALLS_PER_HOUR,
  JSON_CALLS_PER_MINUTE,
  VIA_FILES_CALLS_PER_HOUR,
  VIA_FILES_CALLS_PER_MINUTE,
} from './catalog.js';

/**
 * Sliding-window call budget per endpoint (documented: 5 calls/minute and 20 calls/hour for every
 * via-files endpoint). Retries count: a 429 answer was still a call.
 */
export class CallBudget {
  private readonly calls = new Map<string, number[]>();

  constructor(
    private readonly windows: readonly { limit: number; windowInMs: number }[] = [
      { limit: VIA_FILES_CALLS_PER_MINUTE, windowInMs: 60_000 },
      { limit: VIA_FILES_CALLS_PER_HOUR, windowInMs: 3_600_000 },
    ],
    private readonly now: () => number = Date.now,
  ) {}

  /** Milliseconds until a call to `endpoint` fits the budget (0 = now). */
  waitInMs(endpoint: string): number {
    const history = this.prune(endpoint);
    let wait = 0;
    for (const { limit, windowInMs } of this.windows) {
      const inWindow = history.filter((t) => t > this.now() - windowInMs);
      if (inWindow.length >= limit) {
        const oldestThatCounts = inWindow[inWindow.length - limit] ?? this.now();
        wait = Math.max(wait, oldestThatCounts + windowInMs - this.now());
      }
    }
    return wait;
  }

  record(endpoint: string): void {
    this.prune(endpoint).push(this.now());
  }

  private prune(endpoint: string): number[] {
    const longest = Math.max(...this.windows.map((w) => w.windowInMs));
    const history = (this.calls.get(endpoint) ?? []).filter((t) => t > this.now() - longest);
    this.calls.set(endpoint, history);
    return history;
  }
}

/** The budget of the paged JSON and delta endpoints: 30 calls/minute and 1,000/hour each. */
export function pagedCallBudget(): CallBudget {
  return new CallBudget([
    { limit: JSON_CALLS_PER_MINUTE, windowInMs: 60_000 },
    { limit: JSON_CALLS_PER_HOUR, windowInMs: 3_600_000 },
  ]);
}
