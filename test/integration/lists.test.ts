import { setTimeout as sleep } from 'node:timers/promises';
import { gzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ExportId } from '../../src/core/catalog.js';
import type { SnapshotManifest } from '../../src/core/completion.js';
import { MdvmError } from '../../src/core/errors.js';
import { verifyLanding } from '../../src/ops/verify.js';
import type { SimulatedSnapshot } from '../../src/simulator/simulator.js';
import {
  createApp,
  listBlobNames,
  md5,
  queueTexts,
  replacing,
  type Stack,
  startStack,
  type TestApp,
  tableRows,
  watchingTick,
} from '../helpers/stack.js';

/** Hostile or broken file lists from the Defender API: what the tick records, refuses and completes. */

let stack: Stack;
beforeAll(async () => {
  stack = await startStack();
});
afterAll(async () => {
  await stack?.stop();
});

async function tick(app: TestApp) {
  stack.simulator.resetRateLimits();
  const [report] = await app.runner.tick();
  await app.runner.drain();
  return report;
}

async function manifestOf(app: TestApp, folder: string): Promise<SnapshotManifest> {
  const body = await app.runtime.landing.getBlobClient(`${folder}/_manifest.json`).downloadToBuffer();
  return JSON.parse(body.toString()) as SnapshotManifest;
}

/** A file of another export (ScaExport) beside a certificates snapshot's parts: the tick refuses it. */
function otherExportFile(snap: SimulatedSnapshot): string {
  const org = snap.parts[0]?.relativePath.split('/')[0] ?? '';
  return `${snap.prefix.replace('/CertificateAssessmentExport/', '/ScaExport/')}/${org}/_RbacGroupId=0/part-00000-x.c000.json.gz`;
}

/** Defender's next list for the export names `path` too, signed like its own files. */
function alsoListing(exportId: ExportId, path: string): void {
  stack.simulator.injectFault(exportId, {
    kind: 'rewrite',
    rewrite: (body, sign) => ({ ...body, exportFiles: [...body.exportFiles, sign(path)] }),
  });
}

describe('file lists the tick must not trust blindly', () => {
  it('an empty list records nothing and completes nothing; the files listed later land as usual', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'certificates' });
    const snap = await stack.simulator.publish('certificates', { generatedTime: '2026-11-17T00:01:00Z' });
    stack.simulator.injectFault('certificates', { kind: 'rewrite', rewrite: (body) => ({ ...body, exportFiles: [] }) });
    const first = await tick(app);
    expect(first?.error).toBeUndefined();
    expect(app.events.find((e) => e.event === 'request')).toMatchObject({ outcome: 'empty' });
    expect(await tableRows(app.runtime.storage.snapshotsTable)).toEqual([]);
    expect(await listBlobNames(app)).toEqual([]);

    await tick(app);
    const [row] = await tableRows(app.runtime.storage.snapshotsTable);
    expect(row).toMatchObject({ status: 'complete', partsLanded: snap.parts.length });
    const manifest = await manifestOf(app, 'certificates/snapshot=2026-11-17T0001Z');
    expect(manifest.totals.parts).toBe(snap.parts.length);
  });

  it('a list that grows after completion: the new files land, nothing landed is rewritten, the manifest lists all', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'browser-extensions' });
    const snap = await stack.simulator.publish('browser-extensions', { generatedTime: '2026-11-17T01:01:00Z' });
    stack.simulator.injectFault('browser-extensions', {
      kind: 'rewrite',
      rewrite: (body) => ({ ...body, exportFiles: body.exportFiles.slice(0, 1) }),
    });
    await tick(app);
    const folder = 'browser-extensions/snapshot=2026-11-17T0101Z';
    const partial = await manifestOf(app, folder);
    expect(partial.totals).toEqual({ parts: 1, bytes: expect.any(Number), records: null });
    const firstBlob = app.runtime.landing.getBlobClient(`${folder}/${partial.parts[0]?.part}`);
    const firstEtag = (await firstBlob.getProperties()).etag;

    await tick(app);
    const [row] = await tableRows(app.runtime.storage.snapshotsTable);
    expect(row).toMatchObject({ status: 'complete', partCount: snap.parts.length, partsLanded: snap.parts.length });
    const full = await manifestOf(app, folder);
    expect(full.totals.parts).toBe(snap.parts.length);
    expect(full.parts.map((p) => p.part).sort()).toEqual(snap.parts.map((p) => p.relativePath).sort());
    expect((await firstBlob.getProperties()).etag).toBe(firstEtag);
    for (const p of snap.parts) {
      const landed = await app.runtime.landing.getBlobClient(`${folder}/${p.relativePath}`).downloadToBuffer();
      expect(md5(landed)).toBe(p.md5);
    }
    // A third tick with the same list changes nothing.
    await tick(app);
    expect(app.events.filter((e) => e.event === 'request').at(-1)).toMatchObject({ outcome: 'unchanged' });
  });

  it('a snapshot half a second after another lands in its own folder and completes beside it', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'software-vulnerabilities' });
    const snap = await stack.simulator.publish('software-vulnerabilities', {
      generatedTime: '2026-11-17T07:01:00Z',
      recordsPerPart: 5,
    });
    await tick(app);
    stack.simulator.injectFault('software-vulnerabilities', {
      kind: 'rewrite',
      rewrite: (body) => ({ ...body, generatedTime: '2026-11-17T07:01:00.500Z' }),
    });
    await tick(app);
    const rows = await tableRows(app.runtime.storage.snapshotsTable);
    expect(rows.map((r) => [r.rowKey, r.snapshotId, r.status, r.partsLanded])).toEqual([
      ['2026-11-17T07:01:00.500Z', '2026-11-17T070100.500Z', 'complete', snap.parts.length],
      ['2026-11-17T07:01:00Z', '2026-11-17T0701Z', 'complete', snap.parts.length],
    ]);
    const later = await manifestOf(app, 'software-vulnerabilities/snapshot=2026-11-17T070100.500Z');
    expect(later.totals.parts).toBe(snap.parts.length);
    expect(await app.runtime.poisonQueue.peekMessages()).toMatchObject({ peekedMessageItems: [] });
  });

  it('a generatedTime far in the future is refused whole: no row, no blob, _latest.json untouched', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'hardware-firmware' });
    await stack.simulator.publish('hardware-firmware', { generatedTime: '2026-11-17T02:01:00Z' });
    stack.simulator.injectFault('hardware-firmware', {
      kind: 'rewrite',
      rewrite: (body) => ({ ...body, generatedTime: '9999-12-31T23:59:00Z' }),
    });
    const report = await tick(app);
    expect(report?.error).toMatch(/generatedTime 9999-12-31T23:59:00Z is \d+ minutes ahead of this clock/);
    expect(await tableRows(app.runtime.storage.snapshotsTable)).toEqual([]);
    expect(await listBlobNames(app)).toEqual([]);
  });

  it('a list longer than MDVM_MAX_PARTS_PER_SNAPSHOT is refused whole with the count', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'security-baselines', MDVM_MAX_PARTS_PER_SNAPSHOT: '3' });
    await stack.simulator.publish('security-baselines', { generatedTime: '2026-11-17T03:01:00Z' });
    const report = await tick(app);
    expect(report?.error).toMatch(/listed 9 files .* more than MDVM_MAX_PARTS_PER_SNAPSHOT \(3\); nothing recorded/);
    expect(await tableRows(app.runtime.storage.snapshotsTable)).toEqual([]);
  });

  it('refuses a file of another export and a file whose names exceed Azure limits, lands the good ones, and never completes quietly', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'software-inventory' });
    const snap = await stack.simulator.publish('software-inventory', {
      generatedTime: '2026-11-17T04:01:00Z',
      recordsPerPart: 5,
    });
    const source = stack.simulator.sourceContainer(snap);
    const org = snap.parts[0]?.relativePath.split('/')[0] ?? '';
    const otherExport = `${snap.prefix.replace('/SoftwareInventory/', '/ScaExport/')}/${org}/_RbacGroupId=0/part-00000-x.c000.json.gz`;
    const longPath = `${snap.prefix}/${org}/_RbacGroupId=0/${'a'.repeat(190)}/${'b'.repeat(190)}/${'c'.repeat(190)}/part-00000-y.c000.json.gz`;
    // Listed under another date folder: recorded, landed and reported.
    const otherFolder = `${snap.prefix.replace('/0401/', '/0402/')}/${org}/_RbacGroupId=5/part-00000-z.c000.json.gz`;
    await source.getBlockBlobClient(otherFolder).uploadData(gzipSync('{"a":1}\n'));
    stack.simulator.injectFault('software-inventory', {
      kind: 'rewrite',
      rewrite: (body, sign) => ({
        ...body,
        exportFiles: [...body.exportFiles, sign(otherExport), sign(longPath), sign(otherFolder)],
      }),
    });
    await tick(app);
    const [row] = await tableRows(app.runtime.storage.snapshotsTable);
    expect(row).toMatchObject({
      status: 'failed',
      partCount: snap.parts.length + 3,
      partsRefused: 2,
      partsLanded: snap.parts.length + 1,
    });
    expect(String(row?.lastError)).toMatch(/2 of \d+ file\(s\) refused, so the snapshot cannot complete/);
    const refusals = app.events.filter((e) => e.outcome === 'refused').map((e) => String(e.reason));
    expect(refusals).toEqual(
      expect.arrayContaining([
        expect.stringMatching(/belongs to export ScaExport, not SoftwareInventory/),
        expect.stringMatching(/table key would be \d+ characters \(Azure allows 512\)/),
      ]),
    );
    const parts = await tableRows(app.runtime.storage.partsTable);
    expect(parts).toHaveLength(snap.parts.length + 1);
    expect(parts.every((p) => p.status === 'landed')).toBe(true);
    expect((await listBlobNames(app)).some((n) => n.endsWith('_manifest.json'))).toBe(false);
    // Every later tick says the same and still lands nothing wrong; it does not wedge the export.
    const again = await tick(app);
    expect(again?.error).toBeUndefined();
  });

  it.each([
    [
      'a SAS expiry before year 0',
      (u: string) => u.replace(/([?&])se=[^&]+/, '$1se=-000001-01-01T00%3A00%3A00Z'),
      /SAS expiry se=-000001-01-01T00:00:00Z is not a usable time/,
    ],
    [
      'a URL longer than a message carries',
      (u: string) => `${u}&x=${'a'.repeat(9000)}`,
      /its URL is \d+ characters, and a part message carries at most 8192/,
    ],
  ])('one file with %s is refused alone: the others land on the first tick', async (_, spoil, reason) => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'hardware-firmware', MDVM_ENQUEUE_CONCURRENCY: '2' });
    const snap = await stack.simulator.publish('hardware-firmware', {
      generatedTime: '2026-11-17T02:01:00Z',
      recordsPerPart: 3,
    });
    stack.simulator.injectFault('hardware-firmware', {
      kind: 'rewrite',
      rewrite: (body) => ({ ...body, exportFiles: body.exportFiles.map((u, i) => (i === 0 ? spoil(u) : u)) }),
    });
    const report = await tick(app);
    expect(report?.error).toBeUndefined();
    const parts = await tableRows(app.runtime.storage.partsTable);
    expect(parts).toHaveLength(snap.parts.length - 1);
    expect(parts.every((p) => p.status === 'landed')).toBe(true);
    const [row] = await tableRows(app.runtime.storage.snapshotsTable);
    expect(row).toMatchObject({ partCount: snap.parts.length, partsRefused: 1, partsLanded: snap.parts.length - 1 });
    expect(app.events).toContainEqual(
      expect.objectContaining({ outcome: 'refused', reason: expect.stringMatching(reason) }),
    );
  });

  it('a SAS expiry years ahead is not believed: the part counts as in flight for the documented SAS hours at most', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'certificates' });
    const snap = await stack.simulator.publish('certificates', {
      generatedTime: '2026-11-17T02:01:00Z',
      recordsPerPart: 3,
    });
    stack.simulator.injectFault('certificates', {
      kind: 'rewrite',
      rewrite: (body) => ({
        ...body,
        exportFiles: body.exportFiles.map((u, i) =>
          u.replace(/([?&])se=[^&]+/, i === 0 ? '$1se=10000-01-01' : '$1se=2036-01-01T00%3A00%3A00Z'),
        ),
      }),
    });
    const before = Date.now();
    stack.simulator.resetRateLimits();
    await app.runner.tick();
    const parts = await tableRows(app.runtime.storage.partsTable);
    // Every file recorded, the one dated year 10000 too.
    expect(parts).toHaveLength(snap.parts.length);
    const messages = (await queueTexts(app, 'parts')).map(
      (t) => JSON.parse(Buffer.from(t, 'base64').toString()) as { sasExpiresOn: string },
    );
    expect(messages).toHaveLength(snap.parts.length);
    // Certificates: at most 24 hours, plus the clock skew allowed, in the rows and in the messages.
    for (const expiry of [...parts.map((p) => String(p.sasExpiresOn)), ...messages.map((m) => m.sasExpiresOn)]) {
      expect(Date.parse(expiry)).toBeLessThanOrEqual(before + 24 * 3_600_000 + 11 * 60_000);
    }
  });

  it('a newer list whose every file is refused records nothing and supersedes nothing; the snapshot in progress completes', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'certificates' });
    await stack.simulator.publish('certificates', { generatedTime: '2026-11-17T00:01:00Z', recordsPerPart: 3 });
    // Recorded, but its SAS URLs were dead on arrival: copying, nothing landed yet.
    stack.simulator.injectFault('certificates', { kind: 'expired-sas' });
    await tick(app);
    stack.simulator.injectFault('certificates', {
      kind: 'rewrite',
      rewrite: (body) => ({
        generatedTime: '2026-11-17T01:01:00Z',
        exportFiles: body.exportFiles.map((u) =>
          u.replace(/^http:\/\/127\.0\.0\.1:\d+/, 'http://example.blob.core.windows.net'),
        ),
      }),
    });
    const odd = await tick(app);
    expect(odd?.error).toMatch(/every one was refused .*; nothing recorded/);
    expect((await tableRows(app.runtime.storage.snapshotsTable)).map((r) => [r.rowKey, r.status])).toEqual([
      ['2026-11-17T00:01:00Z', 'copying'],
    ]);
    await tick(app);
    const rows = await tableRows(app.runtime.storage.snapshotsTable);
    expect(rows.map((r) => [r.rowKey, r.status])).toEqual([['2026-11-17T00:01:00Z', 'complete']]);
  });

  it('a newer list with a refused file leaves an older snapshot whose parts are all in flight to complete', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'certificates' });
    const older = await stack.simulator.publish('certificates', {
      generatedTime: '2026-11-17T00:01:00Z',
      recordsPerPart: 3,
    });
    stack.simulator.resetRateLimits();
    await app.runner.tick(); // its messages are on the queue, nothing copied yet
    const newer = await stack.simulator.publish('certificates', {
      generatedTime: '2026-11-17T01:01:00Z',
      recordsPerPart: 3,
    });
    alsoListing('certificates', otherExportFile(newer));
    await tick(app);
    const rows = await tableRows(app.runtime.storage.snapshotsTable);
    expect(rows.map((r) => [r.rowKey, r.status])).toEqual([
      ['2026-11-17T00:01:00Z', 'complete'],
      ['2026-11-17T01:01:00Z', 'failed'],
    ]);
    const latest = JSON.parse(
      (await app.runtime.landing.getBlobClient('certificates/_latest.json').downloadToBuffer()).toString(),
    ) as { snapshot: string };
    expect(latest.snapshot).toBe('2026-11-17T0001Z');
    expect((await manifestOf(app, 'certificates/snapshot=2026-11-17T0001Z')).parts).toHaveLength(older.parts.length);
  });

  it('a newer list with a refused file supersedes an older snapshot that can no longer complete', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'certificates' });
    await stack.simulator.publish('certificates', { generatedTime: '2026-11-17T00:01:00Z', recordsPerPart: 3 });
    stack.simulator.injectFault('certificates', { kind: 'expired-sas' });
    await tick(app); // every SAS dead on arrival: only a new URL from Defender could land its parts, and none will come
    const newer = await stack.simulator.publish('certificates', {
      generatedTime: '2026-11-17T01:01:00Z',
      recordsPerPart: 3,
    });
    alsoListing('certificates', otherExportFile(newer));
    await tick(app);
    const rows = await tableRows(app.runtime.storage.snapshotsTable);
    expect(rows.map((r) => [r.rowKey, r.status])).toEqual([
      ['2026-11-17T00:01:00Z', 'superseded'],
      ['2026-11-17T01:01:00Z', 'failed'],
    ]);
  });

  for (const variant of ['a refused file', 'a part whose source is gone'] as const) {
    it(`copies that settle while a tick still writes the rows of later parts do not fail the snapshot (${variant})`, async () => {
      let releaseSecondWrite = (): void => {};
      const secondWriteHeld = new Promise<void>((resolve) => {
        releaseSecondWrite = resolve;
      });
      let sends = 0;
      const app = await createApp(
        stack,
        { MDVM_EXPORTS: 'certificates' },
        {
          wrapRuntime: watchingTick({
            beforeRowWrite: (n) => (n === 2 ? secondWriteHeld : undefined),
            afterSend: (n) => {
              sends = n;
            },
          }),
        },
      );
      const generatedTime = variant === 'a refused file' ? '2026-11-17T07:01:00Z' : '2026-11-17T08:01:00Z';
      const snap = await stack.simulator.publish('certificates', {
        generatedTime,
        groups: [0, 1, 2, 3, 4],
        partsPerGroup: 49,
        recordsPerPart: 1,
      });
      const org = snap.parts[0]?.relativePath.split('/')[0] ?? '';
      // The refused file goes last; the missing one first, so it fails among the first hundred.
      const extra =
        variant === 'a refused file'
          ? otherExportFile(snap)
          : `${snap.prefix}/${org}/_RbacGroupId=0/part-00000-aaaa-missing.c000.json.gz`;
      stack.simulator.injectFault('certificates', {
        kind: 'rewrite',
        rewrite: (body, sign) => ({
          ...body,
          exportFiles:
            variant === 'a refused file' ? [...body.exportFiles, sign(extra)] : [sign(extra), ...body.exportFiles],
        }),
      });
      stack.simulator.resetRateLimits();
      const ticking = app.runner.tick();
      while (sends < 100) await sleep(20);
      // The first hundred settle while the second hundred rows wait to be written: nothing is stuck, more is coming.
      await app.runner.drain();
      const [during] = await tableRows(app.runtime.storage.snapshotsTable);
      expect(during).toMatchObject({ status: 'copying' });
      releaseSecondWrite();
      const [report] = await ticking;
      expect(report?.error).toBeUndefined();
      await app.runner.drain();
      // Once every part has settled, the snapshot fails for its refused file or its lost source, counting every landed part.
      const [after] = await tableRows(app.runtime.storage.snapshotsTable);
      expect(after).toMatchObject({ status: 'failed', partsLanded: 250, partCount: 251 });
    });
  }

  it('an older snapshot whose tick wrote only some of its rows is superseded by a newer list with a refused file', async () => {
    let writes = 0;
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'certificates' },
      {
        wrapRuntime: replacing('store', (real) => ({
          insertParts: (rows) =>
            ++writes === 2
              ? Promise.reject(new MdvmError('transient', 'table unavailable during the insert'))
              : real.insertParts(rows),
        })),
      },
    );
    await stack.simulator.publish('certificates', {
      generatedTime: '2026-11-17T09:01:00Z',
      groups: [0, 1, 2, 3, 4],
      partsPerGroup: 49,
      recordsPerPart: 1,
    });
    const first = await tick(app);
    expect(first?.error).toMatch(/table unavailable during the insert/);
    // The first hundred landed; the other 150 parts have no row and no message.
    const [older] = await tableRows(app.runtime.storage.snapshotsTable);
    expect(older).toMatchObject({ status: 'copying', partsLanded: 100, partCount: 250 });

    const newer = await stack.simulator.publish('certificates', { generatedTime: '2026-11-17T10:01:00Z' });
    alsoListing('certificates', otherExportFile(newer));
    const report = await tick(app);
    expect(report?.error).toBeUndefined();
    const rows = await tableRows(app.runtime.storage.snapshotsTable);
    expect(rows.find((r) => r.rowKey === '2026-11-17T09:01:00Z')).toMatchObject({ status: 'superseded' });
  });

  it('a snapshot never completes while a file is refused, even when its rows outnumber what the last list had', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'certificates' });
    const snap = await stack.simulator.publish('certificates', {
      generatedTime: '2026-11-17T05:01:00Z',
      recordsPerPart: 3,
    });
    const deadSe = (u: string) => u.replace(/([?&])se=[^&]+/, '$1se=2020-01-01T00%3A00%3A00Z');
    // Tick 1: two files, one dead on arrival. Tick 2: the dead one again (live now) and the rest, but not the first,
    // plus a file of another export.
    stack.simulator.injectFault('certificates', {
      kind: 'rewrite',
      rewrite: (body) => ({ ...body, exportFiles: [body.exportFiles[0] ?? '', deadSe(body.exportFiles[1] ?? '')] }),
    });
    await tick(app);
    const other = otherExportFile(snap);
    stack.simulator.injectFault('certificates', {
      kind: 'rewrite',
      rewrite: (body, sign) => ({ ...body, exportFiles: [...body.exportFiles.slice(1), sign(other)] }),
    });
    await tick(app);
    const parts = await tableRows(app.runtime.storage.partsTable);
    expect(parts.map((p) => p.status)).toEqual(snap.parts.map(() => 'landed'));
    const [row] = await tableRows(app.runtime.storage.snapshotsTable);
    expect(row).toMatchObject({ status: 'failed', partsRefused: 1, partCount: snap.parts.length + 1 });
    expect((await listBlobNames(app)).some((n) => n.endsWith('_manifest.json'))).toBe(false);
  });

  it('a complete snapshot whose list turns out all refused stays complete and says so; the tick does not fail', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'certificates' });
    await stack.simulator.publish('certificates', { generatedTime: '2026-11-17T06:01:00Z', recordsPerPart: 3 });
    await tick(app);
    stack.simulator.injectFault('certificates', {
      kind: 'rewrite',
      rewrite: (body) => ({
        ...body,
        exportFiles: body.exportFiles.map((u) =>
          u.replace(/^http:\/\/127\.0\.0\.1:\d+/, 'http://example.blob.core.windows.net'),
        ),
      }),
    });
    const report = await tick(app);
    expect(report?.error).toBeUndefined();
    const [row] = await tableRows(app.runtime.storage.snapshotsTable);
    expect(row).toMatchObject({ status: 'complete' });
    expect(Number(row?.partsRefused)).toBeGreaterThan(0);
  });

  it('a refused file that Defender stops listing no longer holds the snapshot back', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'certificates' });
    const snap = await stack.simulator.publish('certificates', {
      generatedTime: '2026-11-17T00:01:00Z',
      recordsPerPart: 3,
    });
    alsoListing('certificates', otherExportFile(snap));
    await tick(app);
    expect(await tableRows(app.runtime.storage.snapshotsTable)).toEqual([
      expect.objectContaining({ status: 'failed', partCount: snap.parts.length + 1, partsRefused: 1 }),
    ]);
    const report = await tick(app);
    expect(report?.error).toBeUndefined();
    const [row] = await tableRows(app.runtime.storage.snapshotsTable);
    expect(row).toMatchObject({
      status: 'complete',
      partCount: snap.parts.length,
      partsRefused: 0,
      partsLanded: snap.parts.length,
    });
    expect(row?.lastError ?? '').toBe('');
    const manifest = await manifestOf(app, 'certificates/snapshot=2026-11-17T0001Z');
    expect(manifest.parts).toHaveLength(snap.parts.length);
  });

  it('a complete snapshot whose list later names a refused file stays complete, and status says so', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'security-baselines' });
    const snap = await stack.simulator.publish('security-baselines', {
      generatedTime: '2026-11-17T03:01:00Z',
      recordsPerPart: 3,
    });
    await tick(app);
    stack.simulator.injectFault('security-baselines', {
      kind: 'rewrite',
      rewrite: (body) => ({
        ...body,
        exportFiles: [...body.exportFiles, `http://evil.example/${snap.prefix}/x/part-1.json.gz?sig=abc`],
      }),
    });
    expect((await tick(app))?.error).toBeUndefined();
    const [row] = await tableRows(app.runtime.storage.snapshotsTable);
    expect(row).toMatchObject({ status: 'complete', partsRefused: 1, partsLanded: snap.parts.length });
    expect(String(row?.lastError)).toMatch(
      /1 file\(s\) listed after completion were refused: refused: source URL refused/,
    );
    // Defender stops listing it: the note goes.
    await tick(app);
    const [after] = await tableRows(app.runtime.storage.snapshotsTable);
    expect(after).toMatchObject({ status: 'complete', partsRefused: 0 });
    expect(after?.lastError ?? '').toBe('');
  });

  it('the same file listed twice, once with its = percent-encoded, lands once after its SAS was renewed', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'software-inventory' });
    const snap = await stack.simulator.publish('software-inventory', {
      generatedTime: '2026-11-17T04:01:00Z',
      recordsPerPart: 3,
    });
    stack.simulator.injectFault('software-inventory', { kind: 'expired-sas' });
    await tick(app);
    stack.simulator.injectFault('software-inventory', {
      kind: 'rewrite',
      rewrite: (body) => ({
        ...body,
        exportFiles: [...body.exportFiles, (body.exportFiles[0] ?? '').replace(/%3D/g, '=')],
      }),
    });
    await tick(app);
    const parts = await tableRows(app.runtime.storage.partsTable);
    expect(parts.map((p) => p.status)).toEqual(snap.parts.map(() => 'landed'));
    expect(await queueTexts(app, 'poison')).toEqual([]);
    expect((await tableRows(app.runtime.storage.snapshotsTable))[0]).toMatchObject({ status: 'complete' });
  });

  it('a _latest.json that cannot move (a lease on it) leaves the newer snapshot visibly incomplete until it can', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'secure-configuration' });
    await stack.simulator.publish('secure-configuration', { generatedTime: '2026-11-17T05:01:00Z' });
    await tick(app);
    const pointer = app.runtime.landing.getBlobClient('secure-configuration/_latest.json');
    const lease = pointer.getBlobLeaseClient();
    await lease.acquireLease(-1);

    await stack.simulator.publish('secure-configuration', { generatedTime: '2026-11-17T06:01:00Z' });
    await tick(app);
    const rows = await tableRows(app.runtime.storage.snapshotsTable);
    const newer = rows.find((r) => r.rowKey === '2026-11-17T06:01:00Z');
    expect(newer?.status).not.toBe('complete');
    expect(String(newer?.lastError)).toMatch(/_latest\.json was not moved to this snapshot: .*lease/);
    expect(app.events.some((e) => e.event === 'snapshot' && e.outcome === 'error')).toBe(true);
    expect(JSON.parse((await pointer.downloadToBuffer()).toString())).toMatchObject({
      generatedTime: '2026-11-17T05:01:00Z',
    });
    // verify names the pointer that lags behind what is complete: here nothing newer is complete yet, so it is fine…
    expect((await verifyLanding(app.runtime, { exports: ['secure-configuration'] })).findings).toEqual([]);

    // …and once the lease is gone the next tick moves it and completes the snapshot.
    await lease.releaseLease();
    await tick(app);
    const after = (await tableRows(app.runtime.storage.snapshotsTable)).find(
      (r) => r.rowKey === '2026-11-17T06:01:00Z',
    );
    expect(after).toMatchObject({ status: 'complete' });
    expect(JSON.parse((await pointer.downloadToBuffer()).toString())).toMatchObject({
      generatedTime: '2026-11-17T06:01:00Z',
    });

    // A pointer moved back by hand is a verify finding.
    await pointer.getBlockBlobClient().upload('{"v":1}', 7);
    const report = await verifyLanding(app.runtime, { exports: ['secure-configuration'] });
    expect(report.findings.map((f) => f.kind)).toEqual(['latest-behind']);
  });

  it('a _latest.json aimed at a snapshot that never completed is a verify finding, and the next completion replaces it', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'certificates' });
    await stack.simulator.publish('certificates', { generatedTime: '2026-11-17T07:01:00Z' });
    await tick(app);
    const pointer = app.runtime.landing.getBlockBlobClient('certificates/_latest.json');
    const forged = {
      v: 1,
      export: 'certificates',
      snapshot: '2099-01-01T0000Z',
      generatedTime: '2099-01-01T00:00:00Z',
      manifest: 'certificates/snapshot=2099-01-01T0000Z/_manifest.json',
      updatedAt: '2026-11-17T07:05:00Z',
    };
    await pointer.upload(JSON.stringify(forged), JSON.stringify(forged).length);
    const report = await verifyLanding(app.runtime, { exports: ['certificates'] });
    expect(report.findings).toEqual([
      expect.objectContaining({ kind: 'latest-behind', detail: expect.stringMatching(/manifest .* is not there/) }),
    ]);

    await stack.simulator.publish('certificates', { generatedTime: '2026-11-17T08:01:00Z' });
    await tick(app);
    expect(JSON.parse((await pointer.downloadToBuffer()).toString())).toMatchObject({
      generatedTime: '2026-11-17T08:01:00Z',
      manifest: 'certificates/snapshot=2026-11-17T0801Z/_manifest.json',
    });
    expect((await verifyLanding(app.runtime, { exports: ['certificates'] })).ok).toBe(true);
  });

  it('a landed part rewritten without a Content-MD5 is a verify finding even without --deep', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'certificates' });
    await stack.simulator.publish('certificates', { generatedTime: '2026-11-17T09:01:00Z' });
    await tick(app);
    const manifest = await manifestOf(app, 'certificates/snapshot=2026-11-17T0901Z');
    const part = manifest.parts[0];
    if (!part) throw new Error('no part landed');
    const blob = app.runtime.landing.getBlockBlobClient(part.path);
    const bytes = await blob.downloadToBuffer();
    for (let i = 0; i < bytes.length; i++) bytes[i] = (bytes[i] ?? 0) ^ 0xff;
    // What azcopy or an SDK block upload does: same size, new bytes, no MD5 on the blob.
    await blob.stageBlock(Buffer.from('b1').toString('base64'), bytes, bytes.length);
    await blob.commitBlockList([Buffer.from('b1').toString('base64')]);
    const report = await verifyLanding(app.runtime, { exports: ['certificates'] });
    expect(report.findings).toEqual([
      expect.objectContaining({
        kind: 'md5-mismatch',
        path: part.path,
        detail: expect.stringMatching(/no Content-MD5/),
      }),
    ]);
    const deep = await verifyLanding(app.runtime, { exports: ['certificates'], deep: true });
    expect(deep.findings).toEqual([
      expect.objectContaining({ kind: 'md5-mismatch', path: part.path, detail: expect.stringMatching(/^landed MD5/) }),
    ]);
  });

  it('verify --snapshot with an id no export has is a finding, not "0 snapshots, ok"', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'certificates,secure-configuration' });
    const report = await verifyLanding(app.runtime, {
      exports: ['certificates', 'secure-configuration'],
      snapshot: '2026-11-15T0610Z',
    });
    expect(report.ok).toBe(false);
    expect(report.findings).toEqual([expect.objectContaining({ kind: 'unknown-snapshot' })]);
  });
});
