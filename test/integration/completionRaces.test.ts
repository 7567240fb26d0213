import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { completeSnapshotIfReady } from '../../src/core/completion.js';
import type { SnapshotManifest } from '../../src/core/contracts.js';
import { landPart } from '../../src/core/landPart.js';
import type { PartMessage } from '../../src/core/messages.js';
import { snapshotIdOf } from '../../src/core/parts.js';
import type { Runtime } from '../../src/core/runtime.js';
import { Telemetry } from '../../src/core/telemetry.js';
import { createApp, replacing, type Stack, startStack, type TestApp, tableRows } from '../helpers/stack.js';

/**
 * A completion reads the snapshot's rows, lists its folder, then writes the manifest, moves `_latest.json` and flips
 * the row. These tests let something else happen in the middle, at the listing, as another instance would: a tick
 * that records a part more, a completion of the grown list, a blob deleted and reopened. Whatever the order, the
 * row and the manifest must end up agreeing, and never claim a part that is not there.
 */
let stack: Stack;
beforeAll(async () => {
  stack = await startStack();
});
afterAll(async () => {
  await stack?.stop();
});

const quiet = new Telemetry({ info() {}, warn() {}, error() {} });

/** The runtime with `during` run once, the first time a completion lists a snapshot folder (before or after). */
function atFirstListing(during: () => Promise<void>, when: 'before' | 'after') {
  let fired = false;
  return (runtime: Runtime): Runtime => {
    const real = runtime.landing;
    const landing = Object.assign(Object.create(real) as Runtime['landing'], {
      listBlobsFlat(options?: Parameters<Runtime['landing']['listBlobsFlat']>[0]) {
        const hit = !fired && (options?.prefix ?? '').includes('/snapshot=');
        if (hit) fired = true;
        return (async function* () {
          if (hit && when === 'before') await during();
          const listed = [];
          for await (const blob of real.listBlobsFlat(options)) listed.push(blob);
          if (hit && when === 'after') await during();
          yield* listed;
        })();
      },
    });
    return { ...runtime, landing };
  };
}

/** Defender's first answer for the export lists every file but the last. */
function firstAnswerWithoutTheLastFile(exportId: Parameters<Stack['simulator']['injectFault']>[0]) {
  stack.simulator.injectFault(exportId, {
    kind: 'rewrite',
    rewrite: (body) => ({ ...body, exportFiles: body.exportFiles.slice(0, -1) }),
  });
  stack.simulator.resetRateLimits();
}

/**
 * Other bytes of the same length under the first part row's landing name, with the copier's metadata kept or not:
 * the name and the bytes that were there.
 */
async function overwriteFirstPart(
  runtime: Runtime,
  options: { keepMetadata: boolean },
): Promise<{ name: string; original: Buffer }> {
  const [first] = await tableRows(runtime.storage.partsTable);
  const name = String(first?.landingPath);
  const blob = runtime.landing.getBlockBlobClient(name);
  const original = await blob.downloadToBuffer();
  const { metadata } = await blob.getProperties();
  await blob.uploadData(Buffer.from(original.map((b) => b ^ 0x01)), options.keepMetadata ? { metadata } : {});
  return { name, original };
}

async function manifestOf(app: TestApp, folder: string): Promise<SnapshotManifest> {
  const blob = app.runtime.landing.getBlockBlobClient(`${folder}/_manifest.json`);
  return JSON.parse((await blob.downloadToBuffer()).toString()) as SnapshotManifest;
}

async function snapshotRow(app: TestApp) {
  const [row] = await tableRows(app.runtime.storage.snapshotsTable);
  return row;
}

describe('completion races', () => {
  it('a tick that records one more part while the last part completes: the snapshot completes only with it', async () => {
    let other: TestApp | undefined;
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'browser-extensions' },
      {
        workers: 1,
        wrapRuntime: atFirstListing(async () => {
          stack.simulator.resetRateLimits();
          await other?.runner.tick();
        }, 'before'),
      },
    );
    other = await createApp(stack, app.env);
    const snap = await stack.simulator.publish('browser-extensions', {
      generatedTime: '2026-11-17T01:01:00Z',
      recordsPerPart: 5,
    });
    firstAnswerWithoutTheLastFile('browser-extensions');
    await app.runner.tick();
    await app.runner.drain();

    const folder = 'browser-extensions/snapshot=2026-11-17T0101Z';
    expect(await snapshotRow(app)).toMatchObject({
      status: 'complete',
      partCount: snap.parts.length,
      partsLanded: snap.parts.length,
    });
    expect((await manifestOf(app, folder)).totals.parts).toBe(snap.parts.length);
  });

  it('a slow completion of the shorter list never replaces the manifest of the grown one', async () => {
    let other: TestApp | undefined;
    const folder = 'certificates/snapshot=2026-11-17T0201Z';
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'certificates' },
      {
        workers: 1,
        wrapRuntime: atFirstListing(async () => {
          // Another instance's tick records the last file, its copy lands it and completes the snapshot. (Its
          // message also reaches this instance's queue, where it is a duplicate.)
          if (!other) return;
          stack.simulator.resetRateLimits();
          await other.runner.tick();
          expect(sentByOther).toHaveLength(1);
          for (const text of sentByOther) {
            const message = JSON.parse(Buffer.from(text, 'base64').toString()) as PartMessage;
            expect((await landPart(other.runtime, quiet, message, { dequeueCount: 1 })).outcome).toBe('landed');
          }
          expect((await manifestOf(other, folder)).totals.parts).toBe(9);
        }, 'before'),
      },
    );
    const sentByOther: string[] = [];
    other = await createApp(stack, app.env, {
      wrapRuntime: replacing('queue', (real) => ({
        sendMessage: (...args) => {
          sentByOther.push(args[0]);
          return real.sendMessage(...args);
        },
      })),
    });
    const snap = await stack.simulator.publish('certificates', {
      generatedTime: '2026-11-17T02:01:00Z',
      recordsPerPart: 5,
    });
    expect(snap.parts).toHaveLength(9);
    firstAnswerWithoutTheLastFile('certificates');
    await app.runner.tick();
    await app.runner.drain();

    if ((await snapshotRow(app))?.status !== 'complete')
      console.log(
        'DIAG',
        JSON.stringify(app.events.filter((e) => e.outcome !== 'landed')),
        JSON.stringify(await snapshotRow(app)),
      );
    expect(await snapshotRow(app)).toMatchObject({ status: 'complete', partCount: 9, partsLanded: 9 });
    const manifest = await manifestOf(app, folder);
    expect(manifest.totals.parts).toBe(9);
    expect(new Set(manifest.parts.map((p) => p.part))).toEqual(new Set(snap.parts.map((p) => p.relativePath)));
  });

  it('a blob deleted and reopened by another check after this completion listed it: not completed over the reopen', async () => {
    let other: TestApp | undefined;
    const generatedTime = '2026-11-17T03:01:00Z';
    const folder = 'security-baselines/snapshot=2026-11-17T0301Z';
    let victim = '';
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'security-baselines' },
      {
        workers: 1,
        wrapRuntime: atFirstListing(async () => {
          if (!other) return;
          // One landed blob goes (an operator, a lifecycle rule) and another instance's check finds it missing.
          const [first] = await tableRows(other.runtime.storage.partsTable);
          victim = String(first?.landingPath);
          await other.runtime.landing.getBlobClient(victim).delete();
          expect(await completeSnapshotIfReady(other.runtime, quiet, 'security-baselines', generatedTime)).toBe(false);
        }, 'after'),
      },
    );
    other = await createApp(stack, app.env);
    const snap = await stack.simulator.publish('security-baselines', { generatedTime, recordsPerPart: 5 });
    stack.simulator.resetRateLimits();
    await app.runner.tick();
    await app.runner.drain();

    // The row and the part rows agree: not complete while a part is not landed.
    const parts = await tableRows(app.runtime.storage.partsTable);
    expect(parts.filter((p) => p.status === 'failed').map((p) => p.landingPath)).toEqual([victim]);
    expect((await snapshotRow(app))?.status).toBe('failed');

    // The next tick copies it again, and then the snapshot completes with every blob there.
    stack.simulator.resetRateLimits();
    await app.runner.tick();
    await app.runner.drain();
    expect(await snapshotRow(app)).toMatchObject({ status: 'complete', partsLanded: snap.parts.length });
    const manifest = await manifestOf(app, folder);
    expect(manifest.totals.parts).toBe(snap.parts.length);
    for (const part of manifest.parts) {
      expect(await app.runtime.landing.getBlobClient(part.path).exists()).toBe(true);
    }
  });
  it.each([
    ['without metadata', '2026-11-17T05:01:00Z', false],
    ["with the copier's metadata (as azcopy or a restored version keeps it)", '2026-11-17T06:01:00Z', true],
  ] as const)(
    'a landed blob overwritten with other bytes of the same length, %s: reopened, not listed, copied again',
    async (_how, generatedTime, keepMetadata) => {
      let victim = '';
      let original: Buffer | undefined;
      const app = await createApp(
        stack,
        { MDVM_EXPORTS: 'hardware-firmware' },
        {
          workers: 1,
          wrapRuntime: atFirstListing(async () => {
            ({ name: victim, original } = await overwriteFirstPart(app.runtime, { keepMetadata }));
          }, 'before'),
        },
      );
      const snap = await stack.simulator.publish('hardware-firmware', { generatedTime, recordsPerPart: 5 });
      stack.simulator.resetRateLimits();
      await app.runner.tick();
      await app.runner.drain();
      const folder = `hardware-firmware/snapshot=${snapshotIdOf(generatedTime)}`;
      expect(await snapshotRow(app)).toMatchObject({ status: 'failed' });
      const reopened = (await tableRows(app.runtime.storage.partsTable)).filter((p) => p.status === 'failed');
      expect(reopened.map((p) => [p.landingPath, p.lastError])).toEqual([
        [victim, expect.stringMatching(/its landed blob has MD5 .*, not /)],
      ]);
      expect(await app.runtime.landing.getBlobClient(`${folder}/_manifest.json`).exists()).toBe(false);

      stack.simulator.resetRateLimits();
      await app.runner.tick();
      await app.runner.drain();
      expect(await snapshotRow(app)).toMatchObject({ status: 'complete', partsLanded: snap.parts.length });
      expect(await app.runtime.landing.getBlockBlobClient(victim).downloadToBuffer()).toEqual(original);
    },
  );
  it('a check that finds a blob missing just after another instance completed the snapshot undoes the completion', async () => {
    const generatedTime = '2026-11-17T07:01:00Z';
    let other: TestApp | undefined;
    let check: Promise<boolean> | undefined;
    let victim = '';
    let completionFlipped: () => void = () => {};
    const flipped = new Promise<void>((resolve) => {
      completionFlipped = resolve;
    });
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'security-baselines' },
      {
        workers: 1,
        wrapRuntime: (runtime) =>
          atFirstListing(async () => {
            // This completion has listed every blob. Now one goes, and another instance's check starts; its writes
            // wait until this completion has flipped the row to complete.
            const [first] = await tableRows(runtime.storage.partsTable);
            victim = String(first?.landingPath);
            await runtime.landing.getBlobClient(victim).delete();
            check = other && completeSnapshotIfReady(other.runtime, quiet, 'security-baselines', generatedTime);
          }, 'after')(
            replacing('store', (real) => ({
              updateSnapshot: async (...args) => {
                await real.updateSnapshot(...args);
                completionFlipped();
              },
            }))(runtime),
          ),
      },
    );
    other = await createApp(stack, app.env, {
      wrapRuntime: replacing('store', (real) => ({
        mutateSnapshot: async (...args) => {
          await flipped;
          return real.mutateSnapshot(...args);
        },
        mutatePart: async (...args) => {
          await flipped;
          return real.mutatePart(...args);
        },
      })),
    });
    const snap = await stack.simulator.publish('security-baselines', { generatedTime, recordsPerPart: 5 });
    stack.simulator.resetRateLimits();
    await app.runner.tick();
    await app.runner.drain();
    expect(await check).toBe(false);

    // Not complete over a part that is not there: the row and the part rows agree.
    const parts = await tableRows(app.runtime.storage.partsTable);
    expect(parts.filter((p) => p.status !== 'landed').map((p) => [p.landingPath, p.status])).toEqual([
      [victim, 'failed'],
    ]);
    expect((await snapshotRow(app))?.status).toBe('failed');

    // The next tick copies it again, and the snapshot completes with every blob there.
    stack.simulator.resetRateLimits();
    await app.runner.tick();
    await app.runner.drain();
    expect(await snapshotRow(app)).toMatchObject({ status: 'complete', partsLanded: snap.parts.length });
    expect(await app.runtime.landing.getBlobClient(victim).exists()).toBe(true);
  });
  it('a check whose reading went stale (the part was reopened, copied again and completed meanwhile) changes nothing', async () => {
    const generatedTime = '2026-11-17T08:01:00Z';
    const app = await createApp(stack, { MDVM_EXPORTS: 'hardware-firmware' });
    const snap = await stack.simulator.publish('hardware-firmware', { generatedTime, recordsPerPart: 5 });
    stack.simulator.resetRateLimits();
    await app.runner.tick();
    await app.runner.drain();
    // Every part landed but the snapshot is still copying, as a completion that died before its flip leaves it, and
    // one landed blob now holds other bytes.
    const snapshotId = snapshotIdOf(generatedTime);
    await app.runtime.landing.getBlobClient(`hardware-firmware/snapshot=${snapshotId}/_manifest.json`).delete();
    await app.runtime.store.mutateSnapshot('hardware-firmware', generatedTime, () => ({ status: 'copying' }));
    const { name, original } = await overwriteFirstPart(app.runtime, { keepMetadata: false });
    const victim = app.runtime.landing.getBlockBlobClient(name);

    // A slow check lists the folder (and sees the bytes wrong); before it writes anything, another instance reopens
    // the part, a tick sends it again, it lands and the snapshot completes.
    const other = await createApp(stack, app.env);
    const slow = await createApp(stack, app.env, {
      wrapRuntime: atFirstListing(async () => {
        expect(await completeSnapshotIfReady(other.runtime, quiet, 'hardware-firmware', generatedTime)).toBe(false);
        stack.simulator.resetRateLimits();
        await other.runner.tick();
        await other.runner.drain();
        expect((await snapshotRow(other))?.status).toBe('complete');
      }, 'after'),
    });
    expect(await completeSnapshotIfReady(slow.runtime, quiet, 'hardware-firmware', generatedTime)).toBe(true);

    expect(await snapshotRow(app)).toMatchObject({ status: 'complete', partsLanded: snap.parts.length });
    const parts = await tableRows(app.runtime.storage.partsTable);
    expect(parts.every((p) => p.status === 'landed')).toBe(true);
    expect(await victim.downloadToBuffer()).toEqual(original);
  });
  it('a check that dies between deleting a mismatched blob and reopening its part leaves it for the next check', async () => {
    const generatedTime = '2026-11-17T09:01:00Z';
    let victim = '';
    let original: Buffer | undefined;
    let died = false;
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'hardware-firmware' },
      {
        workers: 1,
        wrapRuntime: (runtime) =>
          atFirstListing(async () => {
            // Other bytes under a landed part's name, with the copier's metadata kept (azcopy, a restored version).
            ({ name: victim, original } = await overwriteFirstPart(runtime, { keepMetadata: true }));
          }, 'before')(
            replacing('store', (real) => ({
              updatePart: (...args) => {
                if (!died && args[1].status === 'failed') {
                  died = true;
                  return Promise.reject(new Error('process died before reopening the part'));
                }
                return real.updatePart(...args);
              },
            }))(runtime),
          ),
      },
    );
    const snap = await stack.simulator.publish('hardware-firmware', { generatedTime, recordsPerPart: 5 });
    stack.simulator.resetRateLimits();
    await app.runner.tick();
    await app.runner.drain();
    expect(died).toBe(true);
    // The redelivery's check found the blob gone and reopened the part.
    expect(await app.runtime.landing.getBlobClient(victim).exists()).toBe(false);
    expect((await tableRows(app.runtime.storage.partsTable)).filter((p) => p.status === 'failed')).toHaveLength(1);

    stack.simulator.resetRateLimits();
    await app.runner.tick();
    await app.runner.drain();
    expect(await snapshotRow(app)).toMatchObject({ status: 'complete', partsLanded: snap.parts.length });
    expect(await app.runtime.landing.getBlockBlobClient(victim).downloadToBuffer()).toEqual(original);
  });
  it('a JSON-mode page missing at the completion: the read fails saying a page is not copied again, the next tick reads anew', async () => {
    await stack.simulator.publish('software-inventory-noncpe', {
      generatedTime: '2026-11-17T10:01:00Z',
      recordsPerPart: 10,
    });
    let victim = '';
    const app = await createApp(
      stack,
      {
        MDVM_EXPORTS: 'software-inventory-noncpe',
        MDVM_JSON_EXPORTS: 'software-inventory-noncpe',
        MDVM_JSON_PAGE_SIZE: '40',
      },
      {
        wrapRuntime: (runtime) =>
          atFirstListing(async () => {
            const [first] = await tableRows(runtime.storage.partsTable);
            victim = String(first?.landingPath);
            await runtime.landing.getBlobClient(victim).delete();
          }, 'before')(runtime),
      },
    );
    stack.simulator.resetRateLimits();
    await app.runner.tick();
    const [failed] = (await app.runtime.store.listSnapshots('software-inventory-noncpe')).map((r) => r.value);
    expect(failed).toMatchObject({ status: 'failed', mode: 'json' });
    expect(failed?.lastError).toMatch(/cannot copy a page again: the next tick starts a new read/);
    expect(victim).toMatch(/json\/page-/);

    stack.simulator.resetRateLimits();
    await app.runner.tick();
    const rows = (await app.runtime.store.listSnapshots('software-inventory-noncpe')).map((r) => r.value.status);
    expect(rows).toEqual(['failed', 'complete']);
  });
});
