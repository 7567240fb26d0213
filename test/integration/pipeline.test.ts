import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { EXPORT_IDS } from '../../src/core/catalog.js';
import type { LatestPointer, SnapshotManifest } from '../../src/core/completion.js';
import type { PartMessage } from '../../src/core/messages.js';
import { encodeKey, partsPartitionKey } from '../../src/core/parts.js';
import type { TelemetryEvent } from '../../src/core/telemetry.js';
import { runIngestion } from '../../src/ops/run.js';
import {
  createApp,
  duplicateQueuedMessages,
  listBlobNames,
  md5,
  replacing,
  type Stack,
  startStack,
  type TestApp,
  tableRows,
} from '../helpers/stack.js';

let stack: Stack;
beforeAll(async () => {
  stack = await startStack();
});
afterAll(async () => {
  await stack?.stop();
});

describe('pipeline end to end (Azurite + simulator)', () => {
  it('lands every part of all nine export types byte-identical, with manifest, _latest.json and table rows', async () => {
    // Tiny single-shot limit: the large part takes the Put Block From URL path.
    const app = await createApp(stack, { MDVM_COPY_SINGLE_SHOT_MAX_MIB: '0.25', MDVM_COPY_BLOCK_SIZE_MIB: '0.0625' });
    const generatedTime = '2026-11-22T18:01:00Z';
    const published = [];
    for (const id of EXPORT_IDS) {
      published.push(
        await stack.simulator.publish(id, {
          generatedTime,
          recordsPerPart: 50,
          ...(id === 'software-vulnerabilities' ? { largePartRecords: 6000 } : {}),
          ...(id === 'certificates' ? { emptyPart: true } : {}),
        }),
      );
    }
    const ticks = await app.runner.tick();
    expect(ticks.filter((t) => t.error)).toEqual([]);
    await app.runner.drain();

    const snapshotId = '2026-11-22T1801Z';
    const landing = app.runtime.landing;
    for (const snap of published) {
      const source = stack.simulator.sourceContainer(snap);
      for (const part of snap.parts) {
        const sourceBytes = await source.getBlockBlobClient(part.blobName).downloadToBuffer();
        const landedPath = `${snap.exportId}/snapshot=${snapshotId}/${part.relativePath}`;
        const landed = landing.getBlockBlobClient(landedPath);
        const landedBytes = await landed.downloadToBuffer();
        expect(md5(landedBytes), landedPath).toBe(md5(sourceBytes));
        const props = await landed.getProperties();
        expect(props.metadata).toEqual({
          mdvm_export: snap.exportId,
          mdvm_generated_time: generatedTime,
          mdvm_source_path: expect.not.stringContaining('?'),
        });
      }
      // Nothing in the snapshot folder but the parts and the manifest.
      const names = await listBlobNames(app, `${snap.exportId}/snapshot=${snapshotId}/`);
      expect(names).toEqual(
        [
          ...snap.parts.map((p) => `${snap.exportId}/snapshot=${snapshotId}/${p.relativePath}`),
          `${snap.exportId}/snapshot=${snapshotId}/_manifest.json`,
        ].sort(),
      );
      const manifest = JSON.parse(
        (
          await landing.getBlockBlobClient(`${snap.exportId}/snapshot=${snapshotId}/_manifest.json`).downloadToBuffer()
        ).toString(),
      ) as SnapshotManifest;
      expect(manifest).toMatchObject({ v: 1, export: snap.exportId, snapshot: snapshotId, generatedTime });
      expect(manifest.totals.parts).toBe(snap.parts.length);
      expect(manifest.totals.bytes).toBe(snap.parts.reduce((s, p) => s + p.bytes, 0));
      expect(manifest.parts.map((p) => p.md5).sort()).toEqual(snap.parts.map((p) => p.md5).sort());
      const latest = JSON.parse(
        (await landing.getBlockBlobClient(`${snap.exportId}/_latest.json`).downloadToBuffer()).toString(),
      ) as LatestPointer;
      expect(latest).toMatchObject({
        export: snap.exportId,
        snapshot: snapshotId,
        manifest: `${snap.exportId}/snapshot=${snapshotId}/_manifest.json`,
      });
    }

    const snapshots = await tableRows(app.runtime.storage.snapshotsTable);
    expect(snapshots).toHaveLength(9);
    for (const row of snapshots) {
      expect(row.rowKey).toBe(generatedTime);
      expect(row).toMatchObject({ status: 'complete', snapshotId });
      expect(row.partsLanded).toBe(row.partCount);
    }
    const parts = await tableRows(app.runtime.storage.partsTable);
    expect(parts).toHaveLength(published.reduce((s, p) => s + p.parts.length, 0));
    const va = published[0];
    const big = va?.parts.at(-1);
    const bigRow = parts.find(
      (r) =>
        r.partitionKey === partsPartitionKey('software-vulnerabilities', snapshotId) &&
        r.rowKey === encodeKey(big?.relativePath ?? ''),
    );
    expect(bigRow).toMatchObject({ status: 'landed', copyMethod: 'block-from-url', bytes: big?.bytes, md5: big?.md5 });
    expect(big?.bytes).toBeGreaterThan(0.25 * 1024 * 1024);
    expect(parts.filter((r) => r.copyMethod === 'copy-from-url').length).toBeGreaterThan(50);
    for (const row of parts) {
      expect(row.status).toBe('landed');
      expect(String(row.rowKey)).not.toMatch(/[/\\#?]/);
      expect(row.path).toMatch(/^OrgId=[^/]+\/_RbacGroupId=\d+\/part-\d{5}-[0-9a-f-]+\.c\d{3}\.json\.gz$/);
      expect(row.attempts).toBe(1);
    }
  });

  it('copies nothing when the snapshot is unchanged', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'software-inventory' });
    await stack.simulator.publish('software-inventory', { generatedTime: '2026-11-22T06:01:00Z', recordsPerPart: 20 });
    await app.runner.tick();
    await app.runner.drain();
    const before = new Map<string, string>();
    for await (const b of app.runtime.landing.listBlobsFlat()) before.set(b.name, String(b.properties.etag));
    const landedEvents = app.events.filter((e) => e.event === 'part' && e.outcome === 'landed').length;

    await app.runner.tick();
    expect((await app.runtime.queue.getProperties()).approximateMessagesCount).toBe(0);
    await app.runner.drain();
    const after = new Map<string, string>();
    for await (const b of app.runtime.landing.listBlobsFlat()) after.set(b.name, String(b.properties.etag));
    expect(after).toEqual(before);
    expect(app.events.filter((e) => e.event === 'part' && e.outcome === 'landed').length).toBe(landedEvents);
    expect(app.events.filter((e) => e.event === 'request').map((e) => e.outcome)).toEqual(['enqueued', 'unchanged']);
  });

  it('resumes a snapshot whose SAS expired half-way, copying no part twice', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'secure-configuration' });
    const snap = await stack.simulator.publish('secure-configuration', {
      generatedTime: '2026-11-22T12:01:00Z',
      recordsPerPart: 20,
    });
    stack.simulator.injectFault('secure-configuration', { kind: 'expired-sas', parts: 4 });
    await app.runner.tick();
    await app.runner.drain();

    let rows = await tableRows(app.runtime.storage.partsTable);
    expect(rows.filter((r) => r.status === 'expired')).toHaveLength(4);
    expect(rows.filter((r) => r.status === 'landed')).toHaveLength(snap.parts.length - 4);
    let snapshot = (await tableRows(app.runtime.storage.snapshotsTable))[0];
    expect(snapshot).toMatchObject({ status: 'copying', partsLanded: snap.parts.length - 4 });
    expect(await listBlobNames(app, 'secure-configuration/snapshot=2026-11-22T1201Z/_manifest.json')).toEqual([]);

    await app.runner.tick();
    const resumed = app.events.filter((e) => e.event === 'request').at(-1);
    expect(resumed).toMatchObject({
      outcome: 'resumed',
      reason: expect.stringContaining(`4 of ${snap.parts.length} parts enqueued`),
    });
    await app.runner.drain();

    rows = await tableRows(app.runtime.storage.partsTable);
    expect(rows.every((r) => r.status === 'landed')).toBe(true);
    snapshot = (await tableRows(app.runtime.storage.snapshotsTable))[0];
    expect(snapshot).toMatchObject({
      status: 'complete',
      partsLanded: snap.parts.length,
      partCount: snap.parts.length,
    });
    const landedPerPart = new Map<string, number>();
    for (const e of app.events) {
      if (e.event === 'part' && e.outcome === 'landed')
        landedPerPart.set(e.part ?? '', (landedPerPart.get(e.part ?? '') ?? 0) + 1);
    }
    expect(landedPerPart.size).toBe(snap.parts.length);
    expect([...landedPerPart.values()].every((n) => n === 1)).toBe(true);
  });

  it('50+ parts, 8 workers, every message delivered twice: one manifest, exact counts', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'browser-extensions' }, { workers: 8 });
    const snap = await stack.simulator.publish('browser-extensions', {
      generatedTime: '2026-11-21T18:01:00Z',
      groups: [0, 12, 31, 44, 51, 52, 53, 54, 55, 56, 57],
      partsPerGroup: 4,
      recordsPerPart: 5,
    });
    expect(snap.parts.length).toBeGreaterThanOrEqual(50);
    await app.runner.tick();
    expect(await duplicateQueuedMessages(app, 2)).toBe(snap.parts.length);
    await app.runner.drain();

    const folder = 'browser-extensions/snapshot=2026-11-21T1801Z/';
    const names = await listBlobNames(app, folder);
    expect(names.filter((n) => n.endsWith('_manifest.json'))).toHaveLength(1);
    expect(names).toHaveLength(snap.parts.length + 1);
    const manifest = JSON.parse(
      (await app.runtime.landing.getBlockBlobClient(`${folder}_manifest.json`).downloadToBuffer()).toString(),
    ) as SnapshotManifest;
    expect(manifest.totals).toEqual({
      parts: snap.parts.length,
      bytes: snap.parts.reduce((s, p) => s + p.bytes, 0),
      records: null,
    });
    const [snapshot] = await tableRows(app.runtime.storage.snapshotsTable);
    expect(snapshot).toMatchObject({
      status: 'complete',
      partCount: snap.parts.length,
      partsLanded: snap.parts.length,
      bytesLanded: manifest.totals.bytes,
    });
    const outcomes = app.events.filter((e) => e.event === 'part').map((e) => e.outcome);
    expect(outcomes.filter((o) => o === 'landed')).toHaveLength(snap.parts.length);
    expect(outcomes.filter((o) => o === 'duplicate')).toHaveLength(snap.parts.length);
    expect(app.events.filter((e) => e.event === 'snapshot' && e.outcome === 'completed')).toHaveLength(1);
  });

  it('500 parts, 64 workers: complete at the end of the run, one manifest, no shared counter to fight over', async () => {
    let snapshotWrites = 0;
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'software-inventory-noncpe' },
      {
        workers: 64,
        wrapRuntime: replacing('store', (real) => ({
          mutateSnapshot: (...args) => {
            snapshotWrites++;
            return real.mutateSnapshot(...args);
          },
          updateSnapshot: (...args) => {
            snapshotWrites++;
            return real.updateSnapshot(...args);
          },
        })),
      },
    );
    const snap = await stack.simulator.publish('software-inventory-noncpe', {
      generatedTime: '2026-11-21T12:01:00Z',
      groups: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
      partsPerGroup: 49,
      recordsPerPart: 2,
    });
    expect(snap.parts).toHaveLength(500);
    await app.runner.tick();
    snapshotWrites = 0;
    await app.runner.drain();
    // Landing a part writes its own row only; the snapshot row is written by the completion (by each of the few
    // deliveries that find nothing left at the same moment), not once per part as a shared counter would be.
    expect(snapshotWrites).toBeGreaterThanOrEqual(1);
    expect(snapshotWrites).toBeLessThan(snap.parts.length / 20);

    const folder = 'software-inventory-noncpe/snapshot=2026-11-21T1201Z/';
    const manifest = JSON.parse(
      (await app.runtime.landing.getBlockBlobClient(`${folder}_manifest.json`).downloadToBuffer()).toString(),
    ) as SnapshotManifest;
    expect(manifest.totals.parts).toBe(500);
    expect((await listBlobNames(app, folder)).filter((n) => n.endsWith('_manifest.json'))).toHaveLength(1);
    const [snapshot] = await tableRows(app.runtime.storage.snapshotsTable);
    expect(snapshot).toMatchObject({ status: 'complete', partCount: 500, partsLanded: 500 });
    expect(app.events.filter((e) => e.event === 'snapshot' && e.outcome === 'completed')).toHaveLength(1);
    expect(app.logs.filter((l) => /contention/.test(l.line))).toEqual([]);
  });

  it('a tick sends each message once its own row exists, while later rows are still being written, and reads no page of rows after', async () => {
    const order: string[] = [];
    const rowMissingAtSend: string[] = [];
    let partPagesRead = 0;
    let app: TestApp | undefined;
    app = await createApp(
      stack,
      { MDVM_EXPORTS: 'software-inventory-noncpe' },
      {
        wrapRuntime: (runtime) =>
          replacing('store', (real) => ({
            insertParts: async (rows) => {
              order.push('insert');
              await real.insertParts(rows);
            },
            listParts: (...args) => {
              partPagesRead++;
              return real.listParts(...args);
            },
          }))(
            replacing('queue', (real) => ({
              sendMessage: async (text, options) => {
                order.push('send');
                const message = JSON.parse(Buffer.from(text, 'base64').toString()) as PartMessage;
                if (!(await app?.runtime.store.getPart(message.export, message.snapshot, message.part))) {
                  rowMissingAtSend.push(message.part);
                }
                return real.sendMessage(text, options);
              },
            }))(runtime),
          ),
      },
    );
    const snap = await stack.simulator.publish('software-inventory-noncpe', {
      generatedTime: '2026-11-21T13:01:00Z',
      groups: [0, 1, 2],
      partsPerGroup: 99,
      recordsPerPart: 1,
    });
    expect(snap.parts).toHaveLength(300);
    const [report] = await app.runner.tick();
    expect(report?.error).toBeUndefined();
    expect(rowMissingAtSend).toEqual([]);
    // Three transactions of 100 rows; the first message goes out before the last transaction starts.
    expect(order.filter((o) => o === 'insert')).toHaveLength(3);
    expect(order.indexOf('send')).toBeLessThan(order.lastIndexOf('insert'));
    // A new snapshot whose parts are all queued: the tick's completion check reads one queued row, no page of rows.
    expect(partPagesRead).toBe(0);

    await app.runner.drain();
    const [snapshot] = await tableRows(app.runtime.storage.snapshotsTable);
    expect(snapshot).toMatchObject({ status: 'complete', partCount: 300, partsLanded: 300 });
  });

  it("run copies the parts of one export while another export's tick is still waiting on Defender", async () => {
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'certificates,hardware-firmware' },
      {
        wrapRuntime: replacing('defender', (real) => ({
          getExportFiles: async (type, options) => {
            if (type.id === 'hardware-firmware') await sleep(3_000);
            return real.getExportFiles(type, options);
          },
        })),
      },
    );
    await stack.simulator.publish('certificates', { generatedTime: '2026-11-21T00:01:00Z', recordsPerPart: 5 });
    await stack.simulator.publish('hardware-firmware', { generatedTime: '2026-11-21T00:01:00Z', recordsPerPart: 5 });
    const events: TelemetryEvent[] = [];
    const report = await runIngestion(app.runtime, {
      exports: ['certificates', 'hardware-firmware'],
      workers: 4,
      timeoutInMs: 60_000,
      onEvent: (event) => events.push(event),
    });
    expect(report.ok).toBe(true);
    const firstLanded = events.findIndex((e) => e.event === 'part' && e.outcome === 'landed');
    const slowTick = events.findIndex((e) => e.event === 'request' && e.export === 'hardware-firmware');
    expect(firstLanded).toBeGreaterThanOrEqual(0);
    expect(firstLanded).toBeLessThan(slowTick);
  });

  it('run --timeout-s bounds a tick stalled on Defender', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'security-baselines' });
    await stack.simulator.publish('security-baselines', { generatedTime: '2026-11-21T01:01:00Z', recordsPerPart: 5 });
    stack.simulator.resetRateLimits();
    stack.simulator.injectFault('security-baselines', { kind: 'stall', ms: 30_000 });
    const started = Date.now();
    const report = await runIngestion(app.runtime, { exports: ['security-baselines'], workers: 2, timeoutInMs: 1_500 });
    expect(Date.now() - started).toBeLessThan(10_000);
    expect(report.ok).toBe(false);
    expect(report.rows[0]).toMatchObject({
      tick: 'error',
      note: expect.stringMatching(/stopped waiting for Defender/),
    });
  });

  it('Ctrl-C stops a tick part-way through a long list; the next run enqueues the rest and completes', async () => {
    const interrupt = new AbortController();
    let sends = 0;
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'software-inventory-noncpe' },
      {
        wrapRuntime: replacing('queue', (real) => ({
          // Ctrl-C once 150 messages are out, while the tick is still enqueuing.
          sendMessage: (...args) => {
            if (++sends === 150) interrupt.abort();
            return real.sendMessage(...args);
          },
        })),
      },
    );
    const snap = await stack.simulator.publish('software-inventory-noncpe', {
      generatedTime: '2026-11-21T02:01:00Z',
      groups: [0, 1, 2, 3, 4, 5],
      partsPerGroup: 49,
      recordsPerPart: 1,
    });
    stack.simulator.resetRateLimits();
    const first = await runIngestion(app.runtime, {
      exports: ['software-inventory-noncpe'],
      workers: 4,
      timeoutInMs: 60_000,
      abortSignal: interrupt.signal,
    });
    expect(sends).toBeLessThan(snap.parts.length);
    expect(first.interrupted).toBe(true);
    expect(first.rows[0]?.note).toMatch(/tick stopped after enqueuing \d+ of 300 parts/);
    const rowsAfterFirst = await tableRows(app.runtime.storage.partsTable);
    expect(rowsAfterFirst.filter((r) => r.status === 'landed').length).toBeLessThan(snap.parts.length);
    // Every message that went out before the stop is recorded as sent, so the next run sends none of them again.
    expect(rowsAfterFirst.filter((r) => r.sasExpiresOn).length).toBe(sends);

    stack.simulator.resetRateLimits();
    const second = await runIngestion(app.runtime, {
      exports: ['software-inventory-noncpe'],
      workers: 16,
      timeoutInMs: 120_000,
    });
    expect(second.ok).toBe(true);
    expect((await tableRows(app.runtime.storage.snapshotsTable))[0]).toMatchObject({
      status: 'complete',
      partsLanded: snap.parts.length,
    });
  });

  it('run reports the snapshot it asked for, not the newest row', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'information-gathering' });
    await stack.simulator.publish('information-gathering', {
      generatedTime: '2026-11-21T06:01:00Z',
      recordsPerPart: 5,
    });
    stack.simulator.resetRateLimits();
    const newer = await runIngestion(app.runtime, {
      exports: ['information-gathering'],
      workers: 4,
      timeoutInMs: 60_000,
    });
    expect(newer.ok).toBe(true);
    // Defender now serves an older snapshot, one of whose files is gone.
    await stack.simulator.publish('information-gathering', {
      generatedTime: '2026-11-21T05:01:00Z',
      recordsPerPart: 5,
    });
    stack.simulator.injectFault('information-gathering', { kind: 'missing-blob' });
    stack.simulator.resetRateLimits();
    const older = await runIngestion(app.runtime, {
      exports: ['information-gathering'],
      workers: 4,
      timeoutInMs: 60_000,
    });
    expect(older.rows[0]).toMatchObject({ snapshot: '2026-11-21T0501Z', status: 'failed', ok: false });
    expect(older.ok).toBe(false);
  });

  it('marks an older incomplete snapshot superseded and keeps what landed', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'hardware-firmware' });
    await stack.simulator.publish('hardware-firmware', { generatedTime: '2026-11-20T00:01:00Z', recordsPerPart: 5 });
    stack.simulator.injectFault('hardware-firmware', { kind: 'expired-sas', parts: 2 });
    await app.runner.tick();
    await app.runner.drain();
    const landedBefore = await listBlobNames(app, 'hardware-firmware/snapshot=2026-11-20T0001Z/');

    await stack.simulator.publish('hardware-firmware', { generatedTime: '2026-11-20T06:01:00Z', recordsPerPart: 5 });
    await app.runner.tick();
    await app.runner.drain();
    const snapshots = await tableRows(app.runtime.storage.snapshotsTable);
    expect(snapshots.map((s) => [s.snapshotId, s.status])).toEqual([
      ['2026-11-20T0001Z', 'superseded'],
      ['2026-11-20T0601Z', 'complete'],
    ]);
    expect(snapshots[0]?.supersededBy).toBe('2026-11-20T06:01:00Z');
    expect(await listBlobNames(app, 'hardware-firmware/snapshot=2026-11-20T0001Z/')).toEqual(landedBefore);
    expect(landedBefore.length).toBeGreaterThan(0);
    const latest = JSON.parse(
      (await app.runtime.landing.getBlockBlobClient('hardware-firmware/_latest.json').downloadToBuffer()).toString(),
    ) as LatestPointer;
    expect(latest.snapshot).toBe('2026-11-20T0601Z');
  });

  it('counts records in stream mode and lands the same bytes', async () => {
    const app = await createApp(stack, {
      MDVM_EXPORTS: 'information-gathering',
      MDVM_COPY_MODE: 'stream',
      MDVM_COUNT_RECORDS: 'true',
      MDVM_STREAM_BUFFER_MIB: '1',
      MDVM_STREAM_BUFFERS: '2',
    });
    const snap = await stack.simulator.publish('information-gathering', {
      generatedTime: '2026-11-22T00:01:00Z',
      recordsPerPart: 40,
      largePartRecords: 6000,
      emptyPart: true,
    });
    await app.runner.tick();
    await app.runner.drain();
    const manifest = JSON.parse(
      (
        await app.runtime.landing
          .getBlockBlobClient('information-gathering/snapshot=2026-11-22T0001Z/_manifest.json')
          .downloadToBuffer()
      ).toString(),
    ) as SnapshotManifest;
    expect(manifest.totals.records).toBe(snap.parts.reduce((s, p) => s + p.records, 0));
    for (const p of snap.parts) {
      const entry = manifest.parts.find((m) => m.part === p.relativePath);
      expect(entry).toMatchObject({ records: p.records, md5: p.md5, bytes: p.bytes });
    }
    expect((await tableRows(app.runtime.storage.partsTable)).every((r) => r.copyMethod === 'stream')).toBe(true);
  });
});
