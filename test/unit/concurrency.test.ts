import { describe, expect, it } from 'vitest';
import { Semaphore, TrailingRuns } from '../../src/core/concurrency.js';

describe('TrailingRuns', () => {
  it('gives every caller a run that started after it called, with far fewer runs than callers', async () => {
    const runs = new TrailingRuns();
    const starts: number[] = [];
    let clock = 0;
    let active = 0;
    let maxActive = 0;
    const work = async (): Promise<void> => {
      starts.push(++clock);
      active++;
      maxActive = Math.max(maxActive, active);
      await new Promise((resolve) => setTimeout(resolve, 5));
      active--;
    };
    const callers: Promise<void>[] = [];
    const calledAt: number[] = [];
    for (let i = 0; i < 50; i++) {
      calledAt.push(++clock);
      const startsBefore = starts.length;
      const done = runs.run('snapshot', work).then(() => {
        // The run this caller waited for is one that started after the call.
        expect(starts.slice(startsBefore).some((s) => s > (calledAt[i] ?? Infinity))).toBe(true);
      });
      callers.push(done);
      if (i % 10 === 0) await new Promise((resolve) => setTimeout(resolve, 2));
    }
    await Promise.all(callers);
    expect(starts.length).toBeGreaterThanOrEqual(2);
    expect(starts.length).toBeLessThan(20);
    expect(maxActive).toBe(1);
  });

  it('keeps keys apart and passes a failure to exactly the callers of the failed run', async () => {
    const runs = new TrailingRuns();
    let calls = 0;
    const failing = runs.run('a', async () => {
      calls++;
      throw new Error('boom');
    });
    const queued = runs.run('a', async () => {
      calls++;
    });
    const other = runs.run('b', async () => {
      calls++;
    });
    await expect(failing).rejects.toThrow('boom');
    await expect(queued).resolves.toBeUndefined();
    await expect(other).resolves.toBeUndefined();
    expect(calls).toBe(3);
    // Nothing is left behind: a later call runs afresh.
    await runs.run('a', async () => {
      calls++;
    });
    expect(calls).toBe(4);
  });
});

describe('Semaphore', () => {
  it('never lets more than its limit run, and serves waiters in arrival order', async () => {
    const semaphore = new Semaphore(2);
    let running = 0;
    let most = 0;
    const started: number[] = [];
    const work = (i: number) =>
      semaphore.run(async () => {
        started.push(i);
        running++;
        most = Math.max(most, running);
        await new Promise((r) => setTimeout(r, 5 + (i % 3) * 5));
        running--;
        return i;
      });
    const results = await Promise.all(Array.from({ length: 10 }, (_, i) => work(i)));
    expect(results).toEqual(Array.from({ length: 10 }, (_, i) => i));
    expect(most).toBe(2);
    expect(semaphore.maxInUse).toBe(2);
    expect(started).toEqual(Array.from({ length: 10 }, (_, i) => i));
  });

  it('frees the slot when the work fails', async () => {
    const semaphore = new Semaphore(1);
    await expect(semaphore.run(async () => Promise.reject(new Error('boom')))).rejects.toThrow('boom');
    await expect(semaphore.run(async () => 'next')).resolves.toBe('next');
  });
});
