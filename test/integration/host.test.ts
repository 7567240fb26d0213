import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MdvmError } from '../../src/core/errors.js';
import { InProcessHost } from '../../src/host/inProcessHost.js';
import { createApp, type Stack, startStack, tableRows } from '../helpers/stack.js';

let stack: Stack;
beforeAll(async () => {
  stack = await startStack();
});
afterAll(async () => {
  await stack?.stop();
});

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
});
