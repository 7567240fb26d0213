import { describe, expect, it } from 'vitest';
import type { PartRow, SnapshotRow, SnapshotStatus } from '../../src/core/manifestStore.js';
import {
  DEAD_ON_ARRIVAL_REASON,
  type OfferedPart,
  planTick,
  statusAfterTick,
  type TickInputs,
} from '../../src/core/tickPlan.js';

/** The timer tick's rules, one table row each, without storage: planTick is a pure function. */
const NOW = new Date('2026-11-23T12:00:00Z');
const MARGIN_MS = 60_000;
const GENERATED = '2026-11-23T06:01:00.000Z';
const SNAPSHOT = '2026-11-23T0601Z';

const minutesFromNow = (m: number) => new Date(NOW.getTime() + m * 60_000);

function offered(name: string, sasExpiresInMinutes: number | undefined = 360): OfferedPart {
  const relativePath = `OrgId=o/_RbacGroupId=1/${name}.json.gz`;
  return {
    relativePath,
    sourcePath: `https://ms.blob.core.windows.net/export/${relativePath}`,
    blobExportName: 'SoftwareVulnerabilitiesExport',
    exportFolder: '2026-11-23/0601',
    sasExpiresOn: sasExpiresInMinutes === undefined ? undefined : minutesFromNow(sasExpiresInMinutes),
    url: `https://ms.blob.core.windows.net/export/${relativePath}?se=x&sig=not-a-real-signature`,
  };
}

function partRow(name: string, status: PartRow['status'], sasExpiresInMinutes?: number): PartRow {
  const p = offered(name);
  return {
    exportId: 'software-vulnerabilities',
    snapshotId: SNAPSHOT,
    path: p.relativePath,
    sourcePath: p.sourcePath,
    landingPath: `software-vulnerabilities/snapshot=${SNAPSHOT}/${p.relativePath}`,
    status,
    attempts: 1,
    sasExpiresOn: sasExpiresInMinutes === undefined ? undefined : minutesFromNow(sasExpiresInMinutes).toISOString(),
  };
}

function snapshotRow(generatedTime: string, status: SnapshotStatus): SnapshotRow {
  return {
    exportId: 'software-vulnerabilities',
    generatedTime,
    snapshotId: generatedTime,
    status,
    partCount: 3,
    partsLanded: 1,
    bytesLanded: 10,
    requestedAt: NOW.toISOString(),
    lastRequestedAt: NOW.toISOString(),
  };
}

function plan(overrides: Partial<TickInputs>) {
  return planTick({
    exportId: 'software-vulnerabilities',
    generatedTime: GENERATED,
    snapshotId: SNAPSHOT,
    offered: [offered('a'), offered('b')],
    snapshot: undefined,
    snapshots: [],
    parts: [],
    now: NOW,
    sasSafetyMarginInMs: MARGIN_MS,
    ...overrides,
  });
}

const pathOf = (name: string) => offered(name).relativePath;
const names = (paths: readonly string[]) => paths.map((p) => p.replace(/^.*\/(\w+)\.json\.gz$/, '$1')).sort();
const enqueued = (p: ReturnType<typeof plan>) => names(p.enqueue.map((x) => x.relativePath));

describe('planTick: the timer tick rules', () => {
  it('a complete snapshot is unchanged: no row, no message, nothing expired', () => {
    const p = plan({
      snapshot: snapshotRow(GENERATED, 'complete'),
      parts: [partRow('a', 'landed'), partRow('b', 'landed')],
    });
    expect(p.unchanged).toBe(true);
    expect(p.createSnapshot).toBeUndefined();
    expect([p.newParts, p.enqueue, p.requeue, p.markExpired, p.expired]).toEqual([[], [], [], [], []]);
  });

  it('a complete snapshot whose file list grew copies the new files and rewrites nothing landed', () => {
    const p = plan({ snapshot: snapshotRow(GENERATED, 'complete'), parts: [partRow('a', 'landed')] });
    expect(p.unchanged).toBe(false);
    expect(p.newParts.map((r) => r.path)).toEqual([pathOf('b')]);
    expect(enqueued(p)).toEqual(['b']);
    expect(p.requeue).toEqual([]);
    expect(p.landed.map((r) => r.path)).toEqual([pathOf('a')]);
  });

  it.each(['queued', 'failed'] as const)(
    'a complete snapshot with a recorded part that is %s (left by a tick or a check that stopped half-way) sends it again',
    (status) => {
      const p = plan({
        snapshot: snapshotRow(GENERATED, 'complete'),
        parts: [partRow('a', 'landed'), partRow('b', status)],
      });
      expect(p.unchanged).toBe(false);
      expect(p.newParts).toEqual([]);
      expect(enqueued(p)).toEqual(['b']);
    },
  );

  it('a new snapshot gets its row (status requested, one part per distinct file) and every part a message', () => {
    const p = plan({ offered: [offered('a'), offered('b'), offered('a')] });
    expect(p.unchanged).toBe(false);
    expect(p.createSnapshot).toMatchObject({ snapshotId: SNAPSHOT, status: 'requested', partCount: 2, partsLanded: 0 });
    expect(p.newParts.map((r) => [r.status, r.sasExpiresOn])).toEqual([
      ['queued', undefined],
      ['queued', undefined],
    ]);
    expect(p.newParts[0]?.landingPath).toBe(`software-vulnerabilities/snapshot=${SNAPSHOT}/${pathOf('a')}`);
    expect(enqueued(p)).toEqual(['a', 'b']);
  });

  it.each([
    ['already expired', -5],
    ['expiring within the safety margin', 0.5],
  ])('a SAS %s is dead on arrival: row expired with the reason, no message', (_what, minutes) => {
    const p = plan({ offered: [offered('a'), offered('dead', minutes)] });
    const dead = p.newParts.find((r) => r.path === pathOf('dead'));
    expect(dead).toMatchObject({ status: 'expired', lastError: DEAD_ON_ARRIVAL_REASON });
    expect(dead?.sasExpiresOn).toBe(minutesFromNow(minutes).toISOString());
    expect(enqueued(p)).toEqual(['a']);
    expect(names(p.expired.map((x) => x.relativePath))).toEqual(['dead']);
  });

  it('a SAS with no expiry is never taken for dead', () => {
    expect(enqueued(plan({ offered: [offered('a', undefined)] }))).toEqual(['a']);
  });

  it.each([
    { existing: partRow('a', 'landed'), message: false, requeue: false, why: 'landed: never copied again' },
    { existing: partRow('a', 'queued', 120), message: false, requeue: false, why: 'queued with a live SAS: in flight' },
    { existing: partRow('a', 'queued', -1), message: true, requeue: true, why: 'queued with a dead SAS: resent' },
    { existing: partRow('a', 'queued', 0.5), message: true, requeue: true, why: 'queued, SAS within the margin' },
    { existing: partRow('a', 'queued'), message: true, requeue: true, why: 'queued, message never sent' },
    { existing: partRow('a', 'expired', -30), message: true, requeue: true, why: 'expired: fresh URL, resent' },
    { existing: partRow('a', 'failed'), message: true, requeue: true, why: 'failed: tried again' },
  ])('resuming, a part that is $why', ({ existing, message, requeue }) => {
    const p = plan({
      snapshot: snapshotRow(GENERATED, 'copying'),
      parts: [existing],
      offered: [offered('a')],
    });
    expect(p.createSnapshot).toBeUndefined();
    expect(p.newParts).toEqual([]);
    expect(enqueued(p)).toEqual(message ? ['a'] : []);
    expect(p.requeue).toEqual(requeue ? [pathOf('a')] : []);
    expect(p.landed.map((r) => r.path)).toEqual(existing.status === 'landed' ? [pathOf('a')] : []);
  });

  it('resuming, a part that needs a message but is offered with a dead SAS is marked expired, not sent', () => {
    const p = plan({
      snapshot: snapshotRow(GENERATED, 'copying'),
      parts: [partRow('a', 'failed'), partRow('b', 'queued', 120)],
      offered: [offered('a', -1), offered('b', -1), offered('c')],
    });
    expect(p.markExpired).toEqual([{ path: pathOf('a'), sasExpiresOn: minutesFromNow(-1).toISOString() }]);
    expect(p.requeue).toEqual([]);
    expect(enqueued(p)).toEqual(['c']);
    expect(p.newParts.map((r) => r.path)).toEqual([pathOf('c')]);
  });

  it('supersedes older snapshots that are not complete, and nothing else', () => {
    const older = ['2026-11-22T00:01:00.000Z', '2026-11-22T06:01:00.000Z', '2026-11-22T12:01:00.000Z'];
    const p = plan({
      snapshots: [
        snapshotRow(older[0] ?? '', 'copying'),
        snapshotRow(older[1] ?? '', 'complete'),
        snapshotRow(older[2] ?? '', 'failed'),
        snapshotRow('2026-11-21T00:01:00.000Z', 'superseded'),
        snapshotRow('2026-11-22T18:01:00.000Z', 'requested'),
        snapshotRow(GENERATED, 'copying'),
        snapshotRow('2026-11-24T00:01:00.000Z', 'copying'),
      ],
    });
    expect(p.supersede.map((s) => s.generatedTime)).toEqual([older[0], older[2], '2026-11-22T18:01:00.000Z']);
  });

  it('orders snapshots by instant: one half a second later is newer, whatever the text says', () => {
    const whole = '2026-11-23T06:01:00Z';
    const half = '2026-11-23T06:01:00.500Z';
    const fromWhole = plan({ generatedTime: whole, snapshots: [snapshotRow(half, 'copying')] });
    expect(fromWhole.supersede).toEqual([]);
    const fromHalf = plan({ generatedTime: half, snapshots: [snapshotRow(whole, 'copying')] });
    expect(fromHalf.supersede.map((s) => s.generatedTime)).toEqual([whole]);
  });

  it('supersedes older snapshots even when this one is unchanged', () => {
    const p = plan({
      snapshot: snapshotRow(GENERATED, 'complete'),
      parts: [partRow('a', 'landed'), partRow('b', 'landed')],
      snapshots: [snapshotRow('2026-11-22T00:01:00.000Z', 'copying'), snapshotRow(GENERATED, 'complete')],
    });
    expect(p.unchanged).toBe(true);
    expect(p.supersede.map((s) => s.generatedTime)).toEqual(['2026-11-22T00:01:00.000Z']);
  });

  it.each([
    ['requested', 0, 'copying'],
    ['requested', 2, 'copying'],
    ['failed', 1, 'copying'],
    ['failed', 0, 'failed'],
    ['copying', 0, 'copying'],
    ['complete', 0, 'complete'],
    ['complete', 3, 'copying'],
    ['superseded', 3, 'superseded'],
  ] as const)('a %s snapshot with %i message(s) sent is %s afterwards', (status, sent, after) => {
    expect(statusAfterTick(status, sent)).toBe(after);
  });
});
