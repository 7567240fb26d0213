import { readFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MdvmError } from '../../src/core/errors.js';
import { COPY_FUNCTION_NAME } from '../../src/functions/specs.js';
import { InProcessHost } from '../../src/host/inProcessHost.js';
import { runIngestion } from '../../src/ops/run.js';
import { createApp, replacing, type Stack, startStack, tableRows } from '../helpers/stack.js';

let stack: Stack;
beforeAll(async () => {
  stack = await startStack();
});
afterAll(async () => {
  await stack?.stop();
});

/** Rejections nobody handled while `work` ran (vitest would report them too, but not say which test). */
async function unhandledDuring<T>(work: () => Promise<T>): Promise<{ result: T | Error; unhandled: unknown[] }> {
  const unhandled: unknown[] = [];
  const onUnhandled = (reason: unknown) => unhandled.push(reason);
  process.on('unhandledRejection', onUnhandled);
  try {
    return { result: await work().catch((error: Error) => error), unhandled };
  } finally {
    // A rejection is reported unhandled a turn after it happens.
    await sleep(50);
    process.off('unhandledRejection', onUnhandled);
  }
}

const connectionReset = () => Object.assign(new Error('read ECONNRESET'), { code: 'ECONNRESET' });

describe('in-process host', () => {
  it('a message received waits for no worker: copies longer than half the lease spend no delivery unstarted', async () => {
    const copies = new Map<string, number>();
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'certificates' },
      {
        wrapCopier: (real) => ({
          copy: async (request) => {
            const n = (copies.get(request.landingPath) ?? 0) + 1;
            copies.set(request.landingPath, n);
            await sleep(1_500);
            if (n === 1) throw new MdvmError('transient', 'first attempt: 503 ServerBusy');
            return real.copy(request);
          },
        }),
      },
    );
    await stack.simulator.publish('certificates', {
      generatedTime: '2026-11-22T06:01:00Z',
      recordsPerPart: 5,
      groups: [0, 12],
      partsPerGroup: 2,
    });
    stack.simulator.resetRateLimits();
    // Two workers for more parts, each copy past half of a 2 s lease: a message fetched ahead of a free worker
    // would wait past it and be handed back, a delivery spent.
    const host = new InProcessHost(app.runtime, { workers: 2, visibilityTimeoutInSeconds: 2, retryDelayInSeconds: 1 });
    await host.tick();
    await host.drain({ timeoutInMs: 60_000 });
    const rows = await tableRows(app.runtime.storage.partsTable);
    expect(rows.length).toBeGreaterThan(2);
    // Each part failed once and landed on its second copy, which was its second delivery.
    expect(rows.map((r) => [r.status, r.attempts, copies.get(String(r.landingPath))])).toEqual(
      rows.map(() => ['landed', 2, 2]),
    );
  });

  it('a message fetched ahead stays invisible while it waits for a worker, past its lease', async () => {
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'certificates' },
      {
        wrapCopier: (real) => ({
          copy: async (request) => {
            await sleep(4_000);
            return real.copy(request);
          },
        }),
      },
    );
    await stack.simulator.publish('certificates', {
      generatedTime: '2026-11-22T07:01:00Z',
      recordsPerPart: 2,
      groups: [0],
      partsPerGroup: 3,
    });
    stack.simulator.resetRateLimits();
    const host = new InProcessHost(app.runtime, { workers: 1, visibilityTimeoutInSeconds: 2 });
    await host.tick();
    const queued = (await app.runtime.queue.peekMessages({ numberOfMessages: 32 })).peekedMessageItems.length;
    expect(queued).toBeGreaterThan(2);
    const drained = host.drain({ timeoutInMs: 120_000 });
    await sleep(3_000);
    // One copying, one fetched ahead for the next free worker: both hidden, though their 2 s lease has passed.
    const visible = (await app.runtime.queue.peekMessages({ numberOfMessages: 32 })).peekedMessageItems.length;
    await drained;
    expect(visible).toBe(queued - 2);
    const rows = await tableRows(app.runtime.storage.partsTable);
    expect(rows.map((r) => [r.status, r.attempts])).toEqual(rows.map(() => ['landed', 1]));
  });

  it('within a lease of the deadline only free workers get messages: none is handed back with a delivery spent', async () => {
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'certificates' },
      {
        wrapCopier: (real) => ({
          copy: async (request) => {
            await sleep(1_500);
            return real.copy(request);
          },
        }),
      },
    );
    await stack.simulator.publish('certificates', {
      generatedTime: '2026-11-22T08:01:00Z',
      recordsPerPart: 2,
      groups: [0, 12],
      partsPerGroup: 2,
    });
    stack.simulator.resetRateLimits();
    const host = new InProcessHost(app.runtime, { workers: 2 });
    await host.tick();
    // Stops taking messages after half a second; the two copies in flight finish within the grace.
    expect(await host.drain({ timeoutInMs: 500 })).toEqual({ unfinished: 0 });
    await host.drain({ timeoutInMs: 60_000 });
    const rows = await tableRows(app.runtime.storage.partsTable);
    expect(rows.length).toBeGreaterThan(2);
    // Every part landed on its first delivery: the ones the first drain never started were never received by it.
    expect(rows.map((r) => [r.status, r.attempts])).toEqual(rows.map(() => ['landed', 1]));
  });

  it('a message that is not base64 and cannot be parked is left to come back, not renewed for good', async () => {
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'certificates' },
      {
        wrapRuntime: (real) => ({
          ...real,
          poisonQueue: new Proxy(real.poisonQueue, {
            get: (target, prop) =>
              prop === 'sendMessage'
                ? () => Promise.reject(Object.assign(new Error('503 ServerBusy'), { statusCode: 503 }))
                : (Reflect.get(target, prop, target) as unknown),
          }),
        }),
      },
    );
    await app.runtime.queue.sendMessage('not base64 !!');
    const host = new InProcessHost(app.runtime, { workers: 1, visibilityTimeoutInSeconds: 2 });
    await expect(host.drain({ timeoutInMs: 30_000 })).rejects.toThrow(/503/);
    await sleep(3_000);
    const visible = (await app.runtime.queue.peekMessages({ numberOfMessages: 32 })).peekedMessageItems;
    expect(visible.map((m) => m.messageText)).toEqual(['not base64 !!']);
  });

  it('run: a receive that fails while the ticks still run is tried again and logged; the run completes', async () => {
    let receives = 0;
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'certificates' },
      {
        wrapRuntime: replacing('queue', (real) => ({
          receiveMessages: (...args) =>
            ++receives === 1 ? Promise.reject(connectionReset()) : real.receiveMessages(...args),
        })),
      },
    );
    await stack.simulator.publish('certificates', { generatedTime: '2026-11-22T07:01:00Z', recordsPerPart: 5 });
    stack.simulator.resetRateLimits();
    const logs: string[] = [];
    const { result, unhandled } = await unhandledDuring(() =>
      runIngestion(app.runtime, {
        exports: ['certificates'],
        workers: 2,
        timeoutInMs: 60_000,
        onLog: (level, line) => logs.push(`${level}: ${line}`),
      }),
    );
    expect(unhandled).toEqual([]);
    expect(result).toMatchObject({ ok: true });
    expect(logs).toContainEqual(
      expect.stringMatching(/^warning: receive on queue parts-\w+ failed \(1 of 5\).*ECONNRESET/),
    );
  });

  it('run: a receive that keeps failing ends the run with one error saying so, nothing unhandled', async () => {
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'certificates' },
      {
        wrapRuntime: replacing('queue', () => ({
          receiveMessages: () => Promise.reject(connectionReset()),
        })),
      },
    );
    await stack.simulator.publish('certificates', { generatedTime: '2026-11-22T08:01:00Z', recordsPerPart: 5 });
    stack.simulator.resetRateLimits();
    const { result, unhandled } = await unhandledDuring(() =>
      runIngestion(app.runtime, { exports: ['certificates'], workers: 2, timeoutInMs: 60_000 }),
    );
    expect(unhandled).toEqual([]);
    expect(result).toBeInstanceOf(Error);
    expect((result as Error).message).toMatch(
      /^receive on queue parts-\w+ failed 5 times in a row, giving up: .*ECONNRESET/,
    );
  });

  it('a renewal still out when the handler ends is waited for: the delete uses its pop receipt, no message comes back', async () => {
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'certificates' },
      {
        wrapCopier: (real) => ({
          copy: async (request) => {
            await sleep(1_100);
            return real.copy(request);
          },
        }),
        // A slow round trip (a distant account): the renewal at 1 s has changed the pop receipt long before it returns.
        wrapRuntime: replacing('queue', (real) => ({
          updateMessage: async (...args) => {
            const response = await real.updateMessage(...args);
            await sleep(1_000);
            return response;
          },
        })),
      },
    );
    await stack.simulator.publish('certificates', {
      generatedTime: '2026-11-22T09:01:00Z',
      recordsPerPart: 5,
      groups: [0],
      partsPerGroup: 2,
    });
    stack.simulator.resetRateLimits();
    const outcomes: string[] = [];
    const host = new InProcessHost(app.runtime, {
      workers: 4,
      visibilityTimeoutInSeconds: 3,
      onTelemetry: (event) => {
        if (event.event === 'part') outcomes.push(String(event.outcome));
      },
    });
    await host.tick();
    await host.drain({ timeoutInMs: 60_000 });
    expect(outcomes.length).toBeGreaterThan(0);
    expect(outcomes.filter((o) => o !== 'landed')).toEqual([]);
    expect((await app.runtime.queue.getProperties()).approximateMessagesCount).toBe(0);
  });

  it('run --timeout-s bounds a copy that never finishes: stopped after a grace, not failed, its message kept', async () => {
    let copies = 0;
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'certificates' },
      {
        wrapCopier: (real) => ({
          // The first copy stalls (a socket that never answers) until it is aborted, as the SDK's requests are.
          copy: (request) =>
            ++copies === 1
              ? new Promise((_, reject) =>
                  request.abortSignal?.addEventListener('abort', () => reject(request.abortSignal?.reason)),
                )
              : real.copy(request),
        }),
      },
    );
    await stack.simulator.publish('certificates', { generatedTime: '2026-11-22T10:01:00Z', recordsPerPart: 5 });
    stack.simulator.resetRateLimits();
    const started = Date.now();
    const outcome = await Promise.race([
      runIngestion(app.runtime, { exports: ['certificates'], workers: 2, timeoutInMs: 4_000 }),
      sleep(40_000).then(() => 'still running' as const),
    ]);
    expect(outcome).not.toBe('still running');
    if (outcome === 'still running') return;
    // The deadline, then the 10 s grace.
    expect(Date.now() - started).toBeLessThan(25_000);
    expect(outcome).toMatchObject({ ok: false, timedOut: true, unfinished: 1 });
    expect(outcome.rows[0]?.note).toMatch(/1 still queued — next run resumes/);
    const rows = await tableRows(app.runtime.storage.partsTable);
    const stopped = rows.filter((r) => r.status !== 'landed');
    expect(stopped).toHaveLength(1);
    expect(stopped[0]).toMatchObject({ attempts: 0 });
    expect(stopped[0]?.lastError ?? '').toBe('');
    expect((await app.runtime.poisonQueue.peekMessages()).peekedMessageItems).toEqual([]);
    expect((await app.runtime.queue.getProperties()).approximateMessagesCount).toBe(1);
  });

  it('a delivery that ignores its abort is left behind: the drain returns and the message is no longer kept hidden', async () => {
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'certificates' },
      { wrapCopier: () => ({ copy: () => new Promise(() => {}) }) },
    );
    await stack.simulator.publish('certificates', {
      generatedTime: '2026-11-22T11:01:00Z',
      recordsPerPart: 5,
      groups: [0],
      partsPerGroup: 1,
    });
    stack.simulator.resetRateLimits();
    const host = new InProcessHost(app.runtime, { workers: 4, visibilityTimeoutInSeconds: 2 });
    await host.tick();
    const queued = (await app.runtime.queue.getProperties()).approximateMessagesCount ?? 0;
    expect(queued).toBeGreaterThan(0);
    const outcome = await Promise.race([
      host.drain({ timeoutInMs: 1_000, stopGraceInMs: 500 }),
      sleep(20_000).then(() => 'still running' as const),
    ]);
    expect(outcome).toEqual({ unfinished: queued });
    // No renewal holds them: visible again once their lease ends.
    await sleep(2_500);
    expect((await app.runtime.queue.peekMessages({ numberOfMessages: 32 })).peekedMessageItems).toHaveLength(queued);
  });

  it('a handler that rejects with undefined has failed: the message is retried, then poisoned, never deleted', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'certificates' });
    await stack.simulator.publish('certificates', {
      generatedTime: '2026-11-22T12:01:00Z',
      recordsPerPart: 5,
      groups: [0],
      partsPerGroup: 1,
    });
    stack.simulator.resetRateLimits();
    const logs: string[] = [];
    const host = new InProcessHost(app.runtime, {
      retryDelayInSeconds: 0,
      onLog: (level, line) => logs.push(`${level}: ${line}`),
    });
    const copy = host.functions.find((f) => f.name === COPY_FUNCTION_NAME) as unknown as { handler: () => unknown };
    copy.handler = () => Promise.reject(undefined);
    await host.tick();
    const queued = (await app.runtime.queue.getProperties()).approximateMessagesCount ?? 0;
    expect(queued).toBeGreaterThan(0);
    await host.drain({ timeoutInMs: 60_000 });
    expect(logs).toContainEqual('error: copy-part failed (delivery 1): undefined');
    expect((await app.runtime.poisonQueue.peekMessages({ numberOfMessages: 32 })).peekedMessageItems).toHaveLength(
      queued,
    );
  });
});

describe('embedded Azurite', () => {
  it.skipIf(process.platform !== 'linux')('is started with its telemetry to Microsoft off', () => {
    const args = readFileSync(`/proc/${stack.azurite.pid}/cmdline`, 'utf8').split('\0');
    expect(args).toContain('--disableTelemetry');
  });
});
