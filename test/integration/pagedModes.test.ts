import { gunzipSync } from 'node:zlib';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { DELTA_EXPORT } from '../../src/core/catalog.js';
import { latestSchema, manifestSchema, type SnapshotManifest } from '../../src/core/contracts.js';
import { verifyLanding } from '../../src/ops/verify.js';
import type { DeltaSlice } from '../../src/simulator/pagedEndpoints.js';
import { generateRecords } from '../../src/simulator/records.js';
import type { SimulatedSnapshot } from '../../src/simulator/simulator.js';
import { createApp, md5, type Stack, startStack, type TestApp } from '../helpers/stack.js';

let stack: Stack;
beforeAll(async () => {
  stack = await startStack();
});
afterAll(async () => {
  await stack?.stop();
});
beforeEach(() => stack.simulator.resetRateLimits());

async function download(app: TestApp, name: string): Promise<Buffer> {
  return app.runtime.landing.getBlobClient(name).downloadToBuffer();
}

/** The newest complete snapshot of an export, found the way downstream does: _latest.json, then its manifest. */
async function latestManifest(app: TestApp, exportId: string): Promise<SnapshotManifest> {
  const latest = latestSchema.parse(JSON.parse((await download(app, `${exportId}/_latest.json`)).toString()));
  return manifestSchema.parse(JSON.parse((await download(app, latest.manifest)).toString()));
}

/** Every record of a manifest's parts, each blob checked against the manifest's length and MD5 first. */
async function recordsOf(app: TestApp, manifest: SnapshotManifest): Promise<string[]> {
  const lines: string[] = [];
  for (const part of manifest.parts) {
    const body = await download(app, part.path);
    expect(body.length).toBe(part.bytes);
    expect(md5(body)).toBe(part.md5);
    const text = gunzipSync(body).toString('utf8');
    const partLines = text === '' ? [] : text.replace(/\n$/, '').split('\n');
    if (part.records !== null) expect(partLines).toHaveLength(part.records);
    lines.push(...partLines);
  }
  return lines;
}

const canonical = (lines: readonly string[]) => lines.map((l) => JSON.stringify(JSON.parse(l))).sort();

/** Every record of a simulated snapshot's part files, as Defender would serve them (the source of truth). */
function sourceRecords(snap: SimulatedSnapshot): string[] {
  return snap.parts.flatMap((p) =>
    generateRecords(snap.exportId, p.generator.seed, p.generator.rbacGroupId, p.records)
      .split('\n')
      .filter((l) => l !== ''),
  );
}

describe('JSON mode: a full snapshot through the paged …ByMachine endpoint', () => {
  it('lands the same records as via files for the same snapshot, in the same layout and manifest contract', async () => {
    await stack.simulator.publish('certificates', { generatedTime: '2026-11-20T06:01:00Z', recordsPerPart: 10 });
    const files = await createApp(stack, { MDVM_EXPORTS: 'certificates' });
    await files.runner.tick();
    await files.runner.drain();
    const viaFiles = await latestManifest(files, 'certificates');

    const json = await createApp(stack, {
      MDVM_EXPORTS: 'certificates',
      MDVM_JSON_EXPORTS: 'certificates',
      MDVM_JSON_PAGE_SIZE: '25',
    });
    await json.runner.tick();
    const viaJson = await latestManifest(json, 'certificates');

    expect(viaFiles.mode).toBe('files');
    expect(viaJson).toMatchObject({ export: 'certificates', exportTitle: viaFiles.exportTitle, mode: 'json' });
    expect(viaJson.totals.records).toBe(90);
    // 90 records in pages of 25: four pages, the last one short.
    expect(viaJson.parts.map((p) => [p.part, p.records])).toEqual([
      ['json/page-00000.json.gz', 25],
      ['json/page-00001.json.gz', 25],
      ['json/page-00002.json.gz', 25],
      ['json/page-00003.json.gz', 15],
    ]);
    expect(viaJson.parts.every((p) => p.path.startsWith(`certificates/snapshot=${viaJson.snapshot}/`))).toBe(true);
    expect(canonical(await recordsOf(json, viaJson))).toEqual(canonical(await recordsOf(files, viaFiles)));
    // `verify --deep` agrees with the manifest, blob by blob.
    const report = await verifyLanding(json.runtime, { exports: ['certificates'], deep: true });
    expect(report).toMatchObject({ ok: true, findings: [] });
    expect(report.checked.blobs).toBe(4);
    // No message went through the queue: the timer read the pages itself.
    expect(await json.runtime.queue.peekMessages()).toMatchObject({ peekedMessageItems: [] });
  });

  it('a page that breaks off is asked for again; a page that keeps failing leaves the read to resume at that page', async () => {
    const snap = await stack.simulator.publish('hardware-firmware', {
      generatedTime: '2026-11-20T07:01:00Z',
      recordsPerPart: 10,
    });
    const app = await createApp(stack, {
      MDVM_EXPORTS: 'hardware-firmware',
      MDVM_JSON_EXPORTS: 'hardware-firmware',
      MDVM_JSON_PAGE_SIZE: '20',
      MDVM_DEFENDER_MAX_RETRIES: '1',
    });
    stack.simulator.injectPageFault('hardware-firmware', { kind: 'truncate' }, { afterPages: 1 });
    stack.simulator.injectPageFault('hardware-firmware', { kind: 'status', status: 503 }, { afterPages: 3, times: 2 });
    const [first] = await app.runner.tick();
    expect(first?.error).toMatch(/503/);
    const [stuck] = (await app.runtime.store.listSnapshots('hardware-firmware')).map((s) => s.value);
    expect(stuck).toMatchObject({ status: 'copying', mode: 'json', partsLanded: 3 });
    expect(stuck?.cursor).toMatch(/\$skiptoken=/);
    expect(stuck?.lastError).toMatch(/page 3: .*503/);

    const [second] = await app.runner.tick();
    expect(second?.error).toBeUndefined();
    const manifest = await latestManifest(app, 'hardware-firmware');
    expect(manifest.snapshot).toBe(stuck?.snapshotId);
    // Every record exactly once: the broken page was not landed twice, the resumed read did not start over.
    expect(canonical(await recordsOf(app, manifest))).toEqual(canonical(sourceRecords(snap)));
  });

  it('two readers resuming the same read at once land every record exactly once, under one manifest', async () => {
    const snap = await stack.simulator.publish('secure-configuration', {
      generatedTime: '2026-11-20T09:01:00Z',
      recordsPerPart: 10,
    });
    const app = await createApp(stack, {
      MDVM_EXPORTS: 'secure-configuration',
      MDVM_JSON_EXPORTS: 'secure-configuration',
      MDVM_JSON_PAGE_SIZE: '10',
      MDVM_DEFENDER_MAX_RETRIES: '0',
    });
    stack.simulator.injectPageFault('secure-configuration', { kind: 'status', status: 500 }, { afterPages: 1 });
    await app.runner.tick();
    const ticks = await Promise.all([app.runner.tick(), app.runner.tick()]);
    // A reader that loses a race stops (the row moved on, or its blocks went with the other's commit) and leaves the
    // read open; a later tick finishes whatever is left.
    for (const [tick] of ticks)
      if (tick?.error) expect(tick.error).toMatch(/another reader (moved past page|landed this page)/);
    const [read] = (await app.runtime.store.listSnapshots('secure-configuration')).map((r) => r.value);
    if (read?.status === 'copying') await app.runner.tick();
    const rows = (await app.runtime.store.listSnapshots('secure-configuration')).map((r) => r.value);
    expect(rows.map((r) => [r.snapshotId, r.status])).toEqual([[read?.snapshotId, 'complete']]);
    const manifest = await latestManifest(app, 'secure-configuration');
    const total = snap.parts.reduce((sum, p) => sum + p.records, 0);
    expect(canonical(await recordsOf(app, manifest))).toEqual(canonical(sourceRecords(snap)));
    expect(manifest.parts.map((p) => p.part)).toEqual(
      Array.from({ length: total / 10 }, (_, i) => `json/page-${String(i).padStart(5, '0')}.json.gz`),
    );
  });

  it('a page that fails the same way every time fails the read, and the next tick starts a new one', async () => {
    await stack.simulator.publish('software-inventory-noncpe', {
      generatedTime: '2026-11-20T10:01:00Z',
      recordsPerPart: 10,
    });
    const app = await createApp(stack, {
      MDVM_EXPORTS: 'software-inventory-noncpe',
      MDVM_JSON_EXPORTS: 'software-inventory-noncpe',
      MDVM_JSON_PAGE_SIZE: '40',
    });
    stack.simulator.injectPageFault('software-inventory-noncpe', { kind: 'status', status: 404 }, { afterPages: 1 });
    const [first] = await app.runner.tick();
    expect(first?.error).toMatch(/unexpected 404/);
    await app.runner.tick();
    const rows = (await app.runtime.store.listSnapshots('software-inventory-noncpe')).map((r) => r.value);
    expect(rows.map((r) => [r.status, r.partsLanded])).toEqual([
      ['failed', 1],
      ['complete', 3],
    ]);
    expect((await latestManifest(app, 'software-inventory-noncpe')).snapshot).toBe(rows[1]?.snapshotId);
  });

  it('never follows a nextLink off the Defender API (the token would go with it)', async () => {
    await stack.simulator.publish('browser-extensions', { generatedTime: '2026-11-20T08:01:00Z', recordsPerPart: 10 });
    const app = await createApp(stack, {
      MDVM_EXPORTS: 'browser-extensions',
      MDVM_JSON_EXPORTS: 'browser-extensions',
      MDVM_JSON_PAGE_SIZE: '30',
    });
    stack.simulator.injectPageFault('browser-extensions', { kind: 'foreign-next-link' });
    const [tick] = await app.runner.tick();
    expect(tick?.error).toMatch(/next page is on https:\/\/elsewhere\.example\.invalid, not on the Defender API/);
    const [row] = (await app.runtime.store.listSnapshots('browser-extensions')).map((s) => s.value);
    expect(row).toMatchObject({ status: 'failed', partsLanded: 1 });
    expect(await app.runtime.landing.getBlobClient('browser-extensions/_latest.json').exists()).toBe(false);
  });

  it('refuses a JSON mode setting for an export it does not run or that has no JSON endpoint, by name', async () => {
    await expect(
      createApp(stack, { MDVM_EXPORTS: 'certificates', MDVM_JSON_EXPORTS: 'browser-extensions' }),
    ).rejects.toThrow(/MDVM_JSON_EXPORTS.*browser-extensions is not in MDVM_EXPORTS/s);
    await expect(
      createApp(stack, { MDVM_EXPORTS: 'information-gathering', MDVM_JSON_EXPORTS: 'information-gathering' }),
    ).rejects.toThrow(/MDVM_JSON_EXPORTS.*has no paged JSON endpoint/s);
  });
});

describe('the software-vulnerability delta', () => {
  const SLICE = DELTA_EXPORT.sliceInMs;
  const iso = (ms: number) => new Date(ms).toISOString();

  it('lands each window with its records and manifest, and moves the watermark only when a window is complete', async () => {
    const now = Date.now();
    const s0 = Math.floor(now / SLICE) * SLICE;
    // The full snapshot the delta continues from, generated a day ago.
    await stack.simulator.publish('software-vulnerabilities', {
      generatedTime: iso(s0 - 4 * SLICE + 30 * 60_000),
      recordsPerPart: 5,
    });
    const app = await createApp(stack, {
      MDVM_EXPORTS: 'software-vulnerabilities',
      MDVM_DELTA_SCHEDULE: '0 30 */6 * * *',
      MDVM_JSON_PAGE_SIZE: '7',
      MDVM_DEFENDER_MAX_RETRIES: '0',
    });

    // No full snapshot yet: the delta refuses, says why, and asks Defender nothing.
    const before = stack.simulator.requests.length;
    await app.runner.tick([DELTA_EXPORT.id]);
    expect(stack.simulator.requests.slice(before)).toEqual([]);
    expect(app.events).toContainEqual(
      expect.objectContaining({
        export: DELTA_EXPORT.id,
        outcome: 'refused',
        reason: expect.stringMatching(/no watermark yet/),
      }),
    );

    await app.runner.tick(['software-vulnerabilities']);
    await app.runner.drain();
    const slices: DeltaSlice[] = [
      { at: iso(s0 - 3 * SLICE + 60_000), records: 6 },
      { at: iso(s0 - 2 * SLICE + 60_000), records: 5, rbacMove: true },
      { at: iso(s0 - SLICE + 60_000), records: 4 },
    ];
    for (const slice of slices) stack.simulator.publishDeltaSlice(slice);

    // The second page fails past its retries: the window stays open at page 1 and no watermark moves.
    stack.simulator.injectPageFault(DELTA_EXPORT.id, { kind: 'status', status: 500 }, { afterPages: 1 });
    const [failed] = await app.runner.tick([DELTA_EXPORT.id]);
    expect(failed?.error).toMatch(/500/);
    const open = (await app.runtime.store.listSnapshots(DELTA_EXPORT.id)).map((s) => s.value);
    expect(open).toEqual([expect.objectContaining({ status: 'copying', mode: 'delta', partsLanded: 1 })]);
    expect(await app.runtime.landing.getBlobClient(`${DELTA_EXPORT.id}/_latest.json`).exists()).toBe(false);

    // The next tick resumes at page 1 and completes the window.
    const [resumed] = await app.runner.tick([DELTA_EXPORT.id]);
    expect(resumed?.error).toBeUndefined();
    const window = await latestManifest(app, DELTA_EXPORT.id);
    const full = (await app.runtime.store.listSnapshots('software-vulnerabilities'))[0]?.value;
    expect(window).toMatchObject({ mode: 'delta', window: { since: full?.generatedTime } });
    expect(window.window?.until).toBe(window.generatedTime);
    const expected = slices.flatMap((s) => stack.simulator.deltaRecordsOf(s));
    const landed = await recordsOf(app, window);
    expect(canonical(landed)).toEqual(canonical(expected));
    expect(landed).toHaveLength(15);
    // The RBAC move is there as Defender sends it: Fixed under the old group, New under the new one.
    const moved = landed.map((l) => JSON.parse(l)).filter((r) => r.id === JSON.parse(expected[6] ?? '{}').id);
    expect(moved.map((r) => [r.status, r.rbacGroupId])).toEqual([
      ['Fixed', 12],
      ['New', 57],
    ]);
    expect(await verifyLanding(app.runtime, { exports: [DELTA_EXPORT.id], deep: true })).toMatchObject({
      ok: true,
      findings: [],
    });
    // The watermark is the start of the newest slice landed: the next window reads that slice again, so changes
    // Defender adds to it later are not lost.
    const [complete] = (await app.runtime.store.listSnapshots(DELTA_EXPORT.id)).map((s) => s.value);
    expect(complete).toMatchObject({ status: 'complete', nextSince: iso(s0 - SLICE) });

    // A late change in that slice, and a new slice: the next window has both, and the newest slice once more.
    const late: DeltaSlice = { at: iso(s0 - SLICE + 2 * 3_600_000), records: 2 };
    const newest: DeltaSlice = { at: iso(s0), records: 3 };
    stack.simulator.publishDeltaSlice(late);
    stack.simulator.publishDeltaSlice(newest);
    await app.runner.tick([DELTA_EXPORT.id]);
    const next = await latestManifest(app, DELTA_EXPORT.id);
    expect(next.window?.since).toBe(iso(s0 - SLICE));
    const again = [slices[2], late, newest].flatMap((s) => (s ? stack.simulator.deltaRecordsOf(s) : []));
    expect(canonical(await recordsOf(app, next))).toEqual(canonical(again));
    const windows = (await app.runtime.store.listSnapshots(DELTA_EXPORT.id)).map((s) => s.value);
    expect(windows.at(-1)).toMatchObject({ status: 'complete', since: iso(s0 - SLICE), nextSince: iso(s0) });
  });

  it('a watermark older than 14 days falls back to a full snapshot, and says so until there is one', async () => {
    const now = Date.now();
    const app = await createApp(stack, {
      MDVM_EXPORTS: 'software-vulnerabilities',
      MDVM_DELTA_SCHEDULE: '0 30 */6 * * *',
    });
    const old = iso(now - 15 * 24 * 3_600_000);
    await app.runtime.store.createSnapshot({
      exportId: DELTA_EXPORT.id,
      generatedTime: old,
      snapshotId: 'old-window',
      status: 'complete',
      partCount: 1,
      partsLanded: 1,
      bytesLanded: 20,
      requestedAt: old,
      lastRequestedAt: old,
      mode: 'delta',
      since: old,
      nextSince: old,
    });
    const before = stack.simulator.requests.length;
    await app.runner.tick([DELTA_EXPORT.id]);
    expect(stack.simulator.requests.slice(before)).toEqual([]);
    const refused = app.events.find((e) => e.export === DELTA_EXPORT.id && e.outcome === 'refused');
    expect(refused?.reason).toMatch(
      /older than Defender keeps changes \(14 days\): land a full software-vulnerabilities/,
    );
    expect(app.logs.some((l) => /warn/.test(l.level) && l.line.includes('older than Defender keeps changes'))).toBe(
      true,
    );

    await stack.simulator.publish('software-vulnerabilities', {
      generatedTime: iso(now - 3_600_000),
      recordsPerPart: 5,
    });
    await app.runner.tick(['software-vulnerabilities']);
    await app.runner.drain();
    await app.runner.tick([DELTA_EXPORT.id]);
    expect(app.events).toContainEqual(
      expect.objectContaining({ outcome: 'resumed', reason: expect.stringMatching(/restarts from the full snapshot/) }),
    );
    const window = await latestManifest(app, DELTA_EXPORT.id);
    expect(window.window?.since).toBe(new Date(now - 3_600_000).toISOString().replace(/:\d\d\.\d{3}Z$/, ':00Z'));
  });
});
