import { Readable } from 'node:stream';
import { gunzipSync } from 'node:zlib';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { DELTA_EXPORT } from '../../src/core/catalog.js';
import { latestSchema, manifestSchema, type SnapshotManifest } from '../../src/core/contracts.js';
import { verifyLanding } from '../../src/ops/verify.js';
import type { DeltaSlice } from '../../src/simulator/pagedEndpoints.js';
import { generateRecords } from '../../src/simulator/records.js';
import type { SimulatedSnapshot } from '../../src/simulator/simulator.js';
import { createApp, md5, replacing, type Stack, startStack, type TestApp, tableRows } from '../helpers/stack.js';

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
      if (tick?.error) expect(tick.error).toMatch(/another reader (moved past page|is landing this page)/);
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

describe('paged reads under overlap and hostile pages', () => {
  /** A second app on the first one's tables, container and queues (another instance, or the CLI beside the app). */
  const shared = (app: TestApp) =>
    Object.fromEntries(
      [
        'MDVM_PARTS_QUEUE',
        'MDVM_DERIVE_QUEUE',
        'MDVM_SNAPSHOTS_TABLE',
        'MDVM_PARTS_TABLE',
        'MDVM_LANDING_CONTAINER',
      ].map((key) => [key, app.env[key] ?? '']),
    );

  /** Pages served by the test instead of Defender: `pages(url, call)` gives each body. */
  const serving = (pages: (url: URL, call: number) => string) => {
    let call = 0;
    return replacing('defender', () => ({
      openPage: async (url: URL) => Readable.from([Buffer.from(pages(url, call++))]),
    }));
  };

  it('a reader that overlapped adopts the page another landed and never replaces it with bytes read later', async () => {
    const snap = await stack.simulator.publish('certificates', {
      generatedTime: '2026-11-21T06:01:00Z',
      recordsPerPart: 10,
    });
    const settings = {
      MDVM_EXPORTS: 'certificates',
      MDVM_JSON_EXPORTS: 'certificates',
      MDVM_JSON_PAGE_SIZE: '10',
      MDVM_DEFENDER_MAX_RETRIES: '0',
    };
    const first = await createApp(stack, settings);
    stack.simulator.injectPageFault('certificates', { kind: 'status', status: 500 });
    await first.runner.tick();
    const [open] = (await first.runtime.store.listSnapshots('certificates')).map((s) => s.value);
    expect(open).toMatchObject({ status: 'copying', partsLanded: 0 });

    // The second reader reads the row (page 0 next) and then waits on Defender, for minutes in real life.
    let release: () => void = () => {};
    let reached: () => void = () => {};
    const waiting = new Promise<void>((resolve) => {
      reached = resolve;
    });
    const gate = new Promise<void>((resolve) => {
      release = resolve;
    });
    let held = false;
    const second = await createApp(
      stack,
      { ...settings, ...shared(first) },
      {
        wrapRuntime: replacing('defender', (real) => ({
          openPage: async (...args: Parameters<typeof real.openPage>) => {
            if (!held) {
              held = true;
              reached();
              await gate;
            }
            return real.openPage(...args);
          },
        })),
      },
    );
    const late = second.runner.tick();
    await waiting;
    // Meanwhile the first reader lands every page and completes; then Defender serves newer data.
    const [done] = await first.runner.tick();
    expect(done?.error).toBeUndefined();
    await stack.simulator.publish('certificates', { generatedTime: '2026-11-22T06:01:00Z', recordsPerPart: 7 });
    release();
    const [lateTick] = await late;
    if (lateTick?.error) expect(lateTick.error).toMatch(/another reader/);

    const manifest = await latestManifest(first, 'certificates');
    expect(manifest.snapshot).toBe(open?.snapshotId);
    expect(canonical(await recordsOf(first, manifest))).toEqual(canonical(sourceRecords(snap)));
    expect(await verifyLanding(first.runtime, { exports: ['certificates'], deep: true })).toMatchObject({
      ok: true,
      findings: [],
    });
  });

  it.each([
    [
      'another endpoint on the same API',
      (url: URL) => `${url.origin}/api/Machines/BrowserExtensionsInventoryByMachine?pageSize=5`,
      /the next page's link leaves \/api\/machines\/HardwareFirmwareInventoryByMachine/,
    ],
    ['its own link (a loop)', (url: URL) => url.href, /this page's own link \(a loop\)/],
    [
      'a link that carries a token',
      (url: URL) => `${url.origin}${url.pathname}?$skiptoken=x&access_token=SECRETTOKEN`,
      /carries a credential; it is neither stored nor followed/,
    ],
    [
      'a link longer than 5,000 characters (it goes into blob metadata and the row)',
      (url: URL) => `${url.origin}${url.pathname}?$skiptoken=${'x'.repeat(5000)}`,
      /not a plain URL of at most 5000 characters/,
    ],
    [
      'a link with a character outside printable ASCII',
      (url: URL) => `${url.origin}${url.pathname}?$skiptoken=a\u2028b`,
      /not a plain URL of at most 5000 characters/,
    ],
  ])('fails the read on a nextLink to %s, and stores nothing of it', async (_, next, problem) => {
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'hardware-firmware', MDVM_JSON_EXPORTS: 'hardware-firmware' },
      { wrapRuntime: serving((url) => JSON.stringify({ value: [{ id: 'r1' }], '@odata.nextLink': next(url) })) },
    );
    const [tick] = await app.runner.tick();
    expect(tick?.error).toMatch(problem);
    const rows = (await app.runtime.store.listSnapshots('hardware-firmware')).map((s) => s.value);
    expect(rows).toEqual([expect.objectContaining({ status: 'failed', partsLanded: 0 })]);
    // The read is over: its end is in the telemetry, so the late-snapshot alert does not wait on it.
    expect(app.events).toContainEqual(
      expect.objectContaining({ event: 'request', snapshot: rows[0]?.snapshotId, outcome: 'failed' }),
    );
    const blobs: string[] = [];
    for await (const blob of app.runtime.landing.listBlobsFlat()) blobs.push(blob.name);
    expect(blobs).toEqual([]);
    expect(JSON.stringify(rows)).not.toContain('SECRETTOKEN');
  });

  it('of two reads begun at the same time, the newest goes on and the other is superseded, with its own event', async () => {
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'hardware-firmware', MDVM_JSON_EXPORTS: 'hardware-firmware' },
      { wrapRuntime: serving(() => JSON.stringify({ value: [{ id: 'r1' }] })) },
    );
    // What two first ticks on two instances leave behind when both start a read before either sees the other's row.
    const first = `${app.runtime.config.defender.baseUrl}/api/machines/HardwareFirmwareInventoryByMachine?pageSize=5`;
    const at = (msAgo: number) => new Date(Date.now() - msAgo).toISOString().replace(/\.\d{3}Z$/, 'Z');
    const [older, newer] = [at(3_000), at(2_000)].map((generatedTime, i) => ({
      exportId: 'hardware-firmware',
      generatedTime,
      snapshotId: `read-${i}`,
      status: 'copying' as const,
      partCount: 1,
      partsLanded: 0,
      bytesLanded: 0,
      recordsLanded: 0,
      requestedAt: generatedTime,
      lastRequestedAt: generatedTime,
      mode: 'json' as const,
      cursor: first,
    }));
    for (const row of [older, newer]) if (row) await app.runtime.store.createSnapshot(row);
    const [tick] = await app.runner.tick();
    expect(tick?.error).toBeUndefined();
    const rows = (await app.runtime.store.listSnapshots('hardware-firmware')).map((s) => s.value);
    expect(rows).toEqual([
      expect.objectContaining({ snapshotId: 'read-0', status: 'superseded', supersededBy: newer?.generatedTime }),
      expect.objectContaining({ snapshotId: 'read-1', status: 'complete', recordsLanded: 1 }),
    ]);
    expect(app.events).toContainEqual(
      expect.objectContaining({
        event: 'request',
        snapshot: 'read-0',
        outcome: 'superseded',
        reason: expect.stringMatching(/another read of hardware-firmware began at the same time; read-1 goes on/),
      }),
    );
  });

  it('stops a read whose links cycle after MDVM_MAX_PARTS_PER_SNAPSHOT pages', async () => {
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'hardware-firmware', MDVM_JSON_EXPORTS: 'hardware-firmware', MDVM_MAX_PARTS_PER_SNAPSHOT: '3' },
      {
        wrapRuntime: serving((url) => {
          const other = url.searchParams.get('$skiptoken') === 'a' ? 'b' : 'a';
          return JSON.stringify({
            value: [{ id: url.search }],
            '@odata.nextLink': `${url.origin}${url.pathname}?$skiptoken=${other}`,
          });
        }),
      },
    );
    const [tick] = await app.runner.tick();
    expect(tick?.error).toMatch(/more than 3 pages \(MDVM_MAX_PARTS_PER_SNAPSHOT\)/);
    const rows = (await app.runtime.store.listSnapshots('hardware-firmware')).map((s) => s.value);
    expect(rows).toEqual([expect.objectContaining({ status: 'failed', partsLanded: 3 })]);
  });

  it('a delta event stamped far in the future never moves the watermark past the window', async () => {
    const slice = DELTA_EXPORT.sliceInMs;
    await stack.simulator.publish('software-vulnerabilities', {
      generatedTime: new Date(Math.floor(Date.now() / slice) * slice - slice + 60_000).toISOString(),
      recordsPerPart: 3,
    });
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'software-vulnerabilities', MDVM_DELTA_SCHEDULE: '0 30 */6 * * *' },
      {
        wrapRuntime: serving(() =>
          JSON.stringify({ value: [{ id: 'x', eventTimestamp: '2099-01-01T00:00:00Z', status: 'New' }] }),
        ),
      },
    );
    await app.runner.tick(['software-vulnerabilities']);
    await app.runner.drain();
    const [tick] = await app.runner.tick([DELTA_EXPORT.id]);
    expect(tick?.error).toBeUndefined();
    const [window] = (await app.runtime.store.listSnapshots(DELTA_EXPORT.id)).map((s) => s.value);
    expect(window?.status).toBe('complete');
    expect(Date.parse(window?.nextSince ?? '')).toBeLessThanOrEqual(Date.parse(window?.generatedTime ?? ''));
  });

  /** Software vulnerabilities read in JSON mode, with the delta scheduled; every page serves one record of now. */
  const jsonModeDeltaApp = () =>
    createApp(
      stack,
      {
        MDVM_EXPORTS: 'software-vulnerabilities',
        MDVM_JSON_EXPORTS: 'software-vulnerabilities',
        MDVM_DELTA_SCHEDULE: '0 30 */6 * * *',
      },
      {
        wrapRuntime: serving(() => JSON.stringify({ value: [{ id: 'r', eventTimestamp: new Date().toISOString() }] })),
      },
    );

  it('a delta that continues a JSON-mode snapshot starts a day before its read began', async () => {
    const app = await jsonModeDeltaApp();
    await app.runner.tick(['software-vulnerabilities']);
    const [full] = (await app.runtime.store.listSnapshots('software-vulnerabilities')).map((s) => s.value);
    expect(full).toMatchObject({ status: 'complete', mode: 'json' });
    await app.runner.tick([DELTA_EXPORT.id]);
    const [window] = (await app.runtime.store.listSnapshots(DELTA_EXPORT.id)).map((s) => s.value);
    // The JSON snapshot is named after when its read began; Defender's data behind it may be older.
    const fullAt = Date.parse(full?.generatedTime ?? '');
    expect(window?.since).toBe(new Date(fullAt - 24 * 3_600_000).toISOString().replace('.000Z', 'Z'));
  });

  it('a delta that continues a JSON-mode snapshot near the 14-day edge starts inside it, and says so', async () => {
    const app = await jsonModeDeltaApp();
    // A JSON read that began 13.5 days ago: a day before it is already past what Defender keeps.
    const fullAt = new Date(Date.now() - 13.5 * 24 * 3_600_000).toISOString().replace(/\.\d{3}Z$/, 'Z');
    await app.runtime.store.createSnapshot({
      exportId: 'software-vulnerabilities',
      generatedTime: fullAt,
      snapshotId: 'old-json-read',
      status: 'complete',
      partCount: 1,
      partsLanded: 1,
      bytesLanded: 20,
      requestedAt: fullAt,
      lastRequestedAt: fullAt,
      mode: 'json',
      cursor: '',
    });
    const started = Date.now();
    const [tick] = await app.runner.tick([DELTA_EXPORT.id]);
    expect(tick?.error).toBeUndefined();
    const [window] = (await app.runtime.store.listSnapshots(DELTA_EXPORT.id)).map((s) => s.value);
    const since = Date.parse(window?.since ?? '');
    expect(since).toBeGreaterThan(Date.parse(fullAt) - 24 * 3_600_000);
    expect(since).toBeGreaterThan(started - DELTA_EXPORT.maxLookbackInMs);
    expect(since).toBeLessThan(Date.parse(fullAt));
    expect(app.events).toContainEqual(
      expect.objectContaining({
        export: DELTA_EXPORT.id,
        outcome: 'resumed',
        reason: expect.stringMatching(/the oldest change Defender still keeps, less than a day before the read/),
      }),
    );
  });

  it("a paged read does not start while this machine's clock is far from the storage service's", async () => {
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'hardware-firmware', MDVM_JSON_EXPORTS: 'hardware-firmware' },
      { wrapRuntime: (runtime) => ({ ...runtime, now: () => new Date(Date.now() + 3 * 86_400_000) }) },
    );
    const asked = stack.simulator.requests.length;
    const [tick] = await app.runner.tick();
    expect(tick?.error).toBeUndefined();
    expect(await app.runtime.store.listSnapshots('hardware-firmware')).toEqual([]);
    expect(stack.simulator.requests.length).toBe(asked);
    expect(app.events).toContainEqual(
      expect.objectContaining({
        outcome: 'refused',
        reason: expect.stringMatching(/is 4320 minutes ahead of the storage service's/),
      }),
    );
  });

  it('an empty full snapshot is not recorded at all, as an empty file list is not', async () => {
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'hardware-firmware', MDVM_JSON_EXPORTS: 'hardware-firmware' },
      { wrapRuntime: serving(() => '{"value":[]}') },
    );
    const [tick] = await app.runner.tick();
    expect(tick?.error).toBeUndefined();
    // Nothing recorded, as for an empty file list: no row, no part row, no blob; the next tick reads again.
    expect(await app.runtime.store.listSnapshots('hardware-firmware')).toEqual([]);
    expect(await tableRows(app.runtime.storage.partsTable)).toEqual([]);
    const blobs: string[] = [];
    for await (const blob of app.runtime.landing.listBlobsFlat()) blobs.push(blob.name);
    expect(blobs).toEqual([]);
    expect(app.events).toContainEqual(
      expect.objectContaining({ outcome: 'refused', reason: expect.stringMatching(/served no record/) }),
    );
  });

  it('fails the read on a page whose JSON ends early every time although the response ends cleanly', async () => {
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'hardware-firmware', MDVM_JSON_EXPORTS: 'hardware-firmware' },
      { wrapRuntime: serving(() => '{"value":[{"a":1}') },
    );
    const [tick] = await app.runner.tick();
    expect(tick?.error).toMatch(/ended early 3 times although the response ended cleanly/);
    const rows = (await app.runtime.store.listSnapshots('hardware-firmware')).map((s) => s.value);
    expect(rows).toEqual([expect.objectContaining({ status: 'failed', partsLanded: 0 })]);
  });
});
