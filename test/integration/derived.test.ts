import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { gunzipSync, gzipSync } from 'node:zlib';
import { DuckDBInstance } from '@duckdb/node-api';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ExportId } from '../../src/core/catalog.js';
import { loadConfig } from '../../src/core/config.js';
import { MdvmError } from '../../src/core/errors.js';
import { createRuntime } from '../../src/core/runtime.js';
import { Telemetry } from '../../src/core/telemetry.js';
import {
  changeSetManifestSchema,
  changesManifestPath,
  curatedManifestPath,
  curatedPartPath,
} from '../../src/derive/contracts.js';
import { deriveSlots, handleDeriveMessage } from '../../src/derive/derive.js';
import { recordNormaliser } from '../../src/derive/normalise.js';
import { ADDITIONAL_PROPERTIES, recordSchema } from '../../src/derive/schemas.js';
import { verifyLanding } from '../../src/ops/verify.js';
import {
  createApp,
  landedChangeSetManifest,
  landedCuratedManifest,
  latestRawManifest,
  publishAndLand,
  readLandedJson,
  type Stack,
  startStack,
  type TestApp,
} from '../helpers/stack.js';

let stack: Stack;
let folder: string;
beforeAll(async () => {
  stack = await startStack();
  folder = mkdtempSync(join(tmpdir(), 'mdvm-derived-'));
});
afterAll(async () => {
  await stack?.stop();
  rmSync(folder, { recursive: true, force: true });
});

const quiet = () => new Telemetry({ info() {}, warn() {}, error() {} });

async function download(app: TestApp, path: string): Promise<string> {
  const file = join(folder, app.suffix, path);
  mkdirSync(dirname(file), { recursive: true });
  writeFileSync(file, await app.runtime.landing.getBlobClient(path).downloadToBuffer());
  return file;
}

const sqlList = (files: readonly string[]) => `[${files.map((f) => `'${f.replaceAll("'", "''")}'`).join(', ')}]`;

describe('curated Parquet', () => {
  it('converts every part of a completed snapshot through the derive queue; DuckDB reads the normalised columns', async () => {
    const exports = 'software-vulnerabilities,certificates,browser-extensions';
    const app = await createApp(stack, {
      MDVM_EXPORTS: exports,
      MDVM_COPY_MODE: 'stream',
      MDVM_COUNT_RECORDS: 'true',
      MDVM_CURATED_EXPORTS: exports,
    });
    for (const id of exports.split(',') as ExportId[]) {
      await stack.simulator.publish(id, { generatedTime: '2026-11-21T06:01:00Z', recordsPerPart: 30, emptyPart: true });
    }
    await app.runner.tick();
    await app.runner.drain();

    const db = await DuckDBInstance.create(':memory:');
    const sql = await db.connect();
    try {
      for (const id of exports.split(',') as ExportId[]) {
        const raw = await latestRawManifest(app, id);
        const curated = await landedCuratedManifest(app, id, raw.snapshot);
        expect(curated.parts.map((p) => p.source)).toEqual(raw.parts.map((p) => p.path));
        expect(curated.totals.rows).toBe(raw.totals.records);
        const files: string[] = [];
        for (const [i, part] of curated.parts.entries()) {
          expect(part.path).toBe(curatedPartPath(raw.parts[i]?.path ?? ''));
          expect(part.rows).toBe(raw.parts[i]?.records);
          files.push(await download(app, part.path));
        }
        // Rows per file, as DuckDB counts them, equal the raw manifest's records per part (the empty part included).
        const counted = await sql.runAndReadAll(
          `select filename, count(*)::INTEGER as n from read_parquet(${sqlList(files)}, filename = true) group by filename`,
        );
        const perFile = new Map(counted.getRowObjectsJS().map((r) => [String(r.filename), Number(r.n)]));
        for (const [i, part] of raw.parts.entries()) expect(perFile.get(files[i] ?? '') ?? 0).toBe(part.records);

        // One casing, typed columns.
        const schema = recordSchema(id);
        const described = await sql.runAndReadAll(
          `describe select * from read_parquet(${sqlList(files)}, hive_partitioning = false)`,
        );
        const types = new Map(described.getRowObjectsJS().map((r) => [String(r.column_name), String(r.column_type)]));
        expect([...types.keys()]).toEqual([...schema.columns.map((c) => c.name), ADDITIONAL_PROPERTIES]);
        const expectedType = {
          string: 'VARCHAR',
          long: 'BIGINT',
          real: 'DOUBLE',
          bool: 'BOOLEAN',
          datetime: 'TIMESTAMP',
          dynamic: 'JSON',
        };
        for (const column of schema.columns) {
          expect(types.get(column.name), column.name).toMatch(new RegExp(`^${expectedType[column.type]}`));
        }

        // The values are the raw records', normalised: compare every row of the first non-empty part.
        const first = raw.parts.findIndex((p) => (p.records ?? 0) > 0);
        const lines = gunzipSync(
          await app.runtime.landing.getBlobClient(raw.parts[first]?.path ?? '').downloadToBuffer(),
        )
          .toString('utf8')
          .split('\n')
          .filter((l) => l !== '');
        const normaliser = recordNormaliser(schema);
        const expected = lines.map((l) => normaliser.normalise(JSON.parse(l)));
        const read = await sql.runAndReadAll(
          `select * from read_parquet('${files[first]}', hive_partitioning = false)`,
        );
        const rows = read.getRowObjectsJS();
        expect(rows).toHaveLength(expected.length);
        for (const [i, row] of rows.entries()) {
          for (const column of schema.columns) {
            const want = expected[i]?.[column.name] ?? null;
            const got = row[column.name] ?? null;
            if (column.type === 'datetime')
              expect(got === null ? null : (got as Date).getTime()).toBe(
                want === null ? null : (want as Date).getTime(),
              );
            else if (column.type === 'long') expect(got === null ? null : Number(got)).toBe(want);
            else if (column.type === 'dynamic') expect(got === null ? null : JSON.parse(String(got))).toEqual(want);
            else expect(got).toBe(want);
          }
        }
      }
    } finally {
      sql.closeSync();
      db.closeSync();
    }
  });

  it('a duplicate delivery changes nothing; a forged or stale message is refused with its reason', async () => {
    const app = await createApp(stack, {
      MDVM_EXPORTS: 'certificates',
      MDVM_CURATED_EXPORTS: 'certificates',
    });
    const raw = await publishAndLand(stack, app, 'certificates', {
      generatedTime: '2026-11-21T07:01:00Z',
      recordsPerPart: 10,
    });
    const target = curatedPartPath(raw.parts[0]?.path ?? '');
    const before = await app.runtime.landing.getBlobClient(target).getProperties();

    const message = {
      v: 1,
      kind: 'curate-part',
      export: 'certificates',
      snapshot: raw.snapshot,
      part: raw.parts[0]?.path,
    };
    const again = await handleDeriveMessage(app.runtime, quiet(), message);
    expect(again.outcome).toBe('duplicate');
    expect((await app.runtime.landing.getBlobClient(target).getProperties()).etag).toBe(before.etag);

    // Forged: a path that is not a part of the manifest, a snapshot that never completed, an unknown kind.
    const forged = [
      { ...message, part: 'certificates/snapshot=2026-11-21T0701Z/../../secrets.json.gz' },
      { ...message, snapshot: '2026-11-21T0801Z' },
      { ...message, kind: 'delete-everything' },
    ];
    await expect(handleDeriveMessage(app.runtime, quiet(), forged[0])).rejects.toThrow(/is not a part of/);
    await expect(handleDeriveMessage(app.runtime, quiet(), forged[1])).rejects.toThrow(/not a complete snapshot/);
    await expect(handleDeriveMessage(app.runtime, quiet(), forged[2])).rejects.toThrow(/derive schema/);
    // Through the host: the invalid one is parked at once with its reason, nothing is written.
    for (const m of forged) {
      await app.runtime.storage.deriveQueue.sendMessage(Buffer.from(JSON.stringify(m)).toString('base64'));
    }
    await app.runner.drain();
    const parked = (await app.runtime.storage.derivePoisonQueue.peekMessages({ numberOfMessages: 32 }))
      .peekedMessageItems;
    const reasons = parked.map((p) => JSON.parse(Buffer.from(p.messageText, 'base64').toString()).reason as string);
    expect(reasons).toEqual(
      expect.arrayContaining([expect.stringMatching(/is not a part of/), expect.stringMatching(/derive schema/)]),
    );
    const names: string[] = [];
    for await (const b of app.runtime.landing.listBlobsFlat({ prefix: 'curated/' })) names.push(b.name);
    expect(names.filter((n) => !n.startsWith(`curated/certificates/snapshot=${raw.snapshot}/`))).toEqual([]);
    // Each parked message is a telemetry event, with the export and snapshot when the message names them.
    const parkedEvents = app.events.filter((e) => e.event === 'derived' && e.outcome === 'dead-lettered');
    expect(parkedEvents.map((e) => [e.export, e.snapshot, e.method])).toEqual(
      expect.arrayContaining([
        ['certificates', raw.snapshot, 'curated'],
        ['certificates', '2026-11-21T0801Z', 'curated'],
        [undefined, undefined, undefined],
      ]),
    );
    expect(parkedEvents).toHaveLength(3);
  });

  it('runs at most MDVM_DERIVE_CONCURRENCY conversions at once in a process, whatever the host hands it', async () => {
    const app = await createApp(stack, {
      MDVM_EXPORTS: 'security-baselines',
      MDVM_CURATED_EXPORTS: 'security-baselines',
      MDVM_DERIVE_CONCURRENCY: '1',
    });
    const raw = await publishAndLand(stack, app, 'security-baselines', {
      generatedTime: '2026-11-21T11:01:00Z',
      recordsPerPart: 10,
    });
    const curated = await landedCuratedManifest(app, 'security-baselines', raw.snapshot);
    expect(curated.totals.parts).toBe(raw.parts.length);
    expect(deriveSlots(app.runtime).maxInUse).toBe(1);
    expect(() => loadConfig({ ...app.env, MDVM_DERIVE_CONCURRENCY: '0' })).toThrow(/MDVM_DERIVE_CONCURRENCY/);
  });

  it('verify reports derived data that is missing, stale or incomplete, and nothing when it is whole', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'certificates' });
    const raw = await publishAndLand(stack, app, 'certificates', {
      generatedTime: '2026-11-21T12:01:00Z',
      recordsPerPart: 5,
    });
    expect((await verifyLanding(app.runtime, { exports: ['certificates'] })).findings).toEqual([]);

    // Turned on after the snapshot completed: verify says what is not built yet.
    const optedIn = createRuntime(
      loadConfig({ ...app.env, MDVM_CURATED_EXPORTS: 'certificates', MDVM_CHANGE_SET_EXPORTS: 'certificates' }),
    );
    const before = await verifyLanding(optedIn, { exports: ['certificates'] });
    expect(before.findings.map((f) => [f.kind, f.path])).toEqual([
      ['derived-missing', curatedManifestPath('certificates', raw.snapshot)],
      ['derived-missing', changesManifestPath('certificates', raw.snapshot)],
    ]);
    for (const m of [
      { v: 1, kind: 'curate-part', export: 'certificates', snapshot: raw.snapshot, part: raw.parts[0]?.path },
      ...raw.parts
        .slice(1)
        .map((p) => ({ v: 1, kind: 'curate-part', export: 'certificates', snapshot: raw.snapshot, part: p.path })),
      { v: 1, kind: 'change-set', export: 'certificates', snapshot: raw.snapshot },
    ]) {
      await handleDeriveMessage(optedIn, quiet(), m);
    }
    expect((await verifyLanding(optedIn, { exports: ['certificates'] })).findings).toEqual([]);

    // A curated file deleted, and a change set whose manifest no longer matches the raw part list.
    const curated = await landedCuratedManifest(app, 'certificates', raw.snapshot);
    await app.runtime.landing.getBlobClient(curated.parts[1]?.path ?? '').delete();
    const changesPath = changesManifestPath('certificates', raw.snapshot);
    const changes = changeSetManifestSchema.parse(await readLandedJson(app, changesPath));
    const stale = `${JSON.stringify({ ...changes, sourceDigest: 'not-this-part-list' })}\n`;
    await app.runtime.landing.getBlockBlobClient(changesPath).upload(stale, Buffer.byteLength(stale));
    const after = await verifyLanding(optedIn, { exports: ['certificates'] });
    expect(after.ok).toBe(false);
    expect(after.findings.map((f) => [f.kind, f.path])).toEqual([
      ['missing', curated.parts[1]?.path],
      ['derived-stale', changesPath],
    ]);
  });

  it('rebuilds curated and change-set manifests when Defender later lists more files for the same snapshot', async () => {
    const app = await createApp(stack, {
      MDVM_EXPORTS: 'certificates',
      MDVM_CURATED_EXPORTS: 'certificates',
      MDVM_CHANGE_SET_EXPORTS: 'certificates',
    });
    const before = await publishAndLand(stack, app, 'certificates', {
      generatedTime: '2026-11-21T10:01:00Z',
      recordsPerPart: 10,
    });
    const curatedBefore = await landedCuratedManifest(app, 'certificates', before.snapshot);
    expect(curatedBefore.totals.parts).toBe(before.parts.length);

    // The same snapshot, listed again with one more (empty) part: the raw manifest is replaced under its ETag.
    await stack.simulator.publish('certificates', {
      generatedTime: '2026-11-21T10:01:00Z',
      recordsPerPart: 10,
      emptyPart: true,
    });
    stack.simulator.resetRateLimits();
    await app.runner.tick();
    await app.runner.drain();
    const after = await latestRawManifest(app, 'certificates');
    expect(after.parts.length).toBe(before.parts.length + 1);
    const curatedAfter = await landedCuratedManifest(app, 'certificates', after.snapshot);
    expect(curatedAfter.parts.map((p) => p.source)).toEqual(after.parts.map((p) => p.path));
    expect(curatedAfter.sourceDigest).not.toBe(curatedBefore.sourceDigest);
    const changes = await landedChangeSetManifest(app, 'certificates', after.snapshot);
    expect(changes.sourceDigest).toBe(curatedAfter.sourceDigest);
  });

  it('refuses a raw part whose bytes are not the ones its manifest lists, or whose gzip is truncated', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'hardware-firmware' });
    const raw = await publishAndLand(stack, app, 'hardware-firmware', {
      generatedTime: '2026-11-21T09:01:00Z',
      recordsPerPart: 10,
    });
    const [changed, truncated] = raw.parts;
    const body = await app.runtime.landing.getBlobClient(changed?.path ?? '').downloadToBuffer();
    const swapped = gzipSync(Buffer.from(gunzipSync(body).toString().replaceAll('contoso', 'CONTOSO')));
    await app.runtime.landing.getBlockBlobClient(changed?.path ?? '').uploadData(swapped);
    const cut = await app.runtime.landing.getBlobClient(truncated?.path ?? '').downloadToBuffer();
    await app.runtime.landing.getBlockBlobClient(truncated?.path ?? '').uploadData(cut.subarray(0, cut.length - 9));
    const at = (p: typeof changed) => ({
      v: 1,
      kind: 'curate-part',
      export: 'hardware-firmware',
      snapshot: raw.snapshot,
      part: p?.path,
    });
    const error1 = await handleDeriveMessage(app.runtime, quiet(), at(changed)).catch((e: unknown) => e);
    expect(error1).toBeInstanceOf(MdvmError);
    expect((error1 as MdvmError).message).toMatch(/is not the part its manifest lists|bytes, its manifest says/);
    const error2 = await handleDeriveMessage(app.runtime, quiet(), at(truncated)).catch((e: unknown) => e);
    expect((error2 as MdvmError).message).toMatch(/not valid gzip|bytes, its manifest says/);
    const names: string[] = [];
    for await (const b of app.runtime.landing.listBlobsFlat({ prefix: 'curated/' })) names.push(b.name);
    expect(names).toEqual([]);
  });
});

type Row = Record<string, unknown>;

/** Two snapshots of one export, built by hand and landed through the real pipeline; the change set of the second. */
async function changesBetween(exportId: ExportId, before: Row[], after: Row[]) {
  const app = await createApp(stack, { MDVM_EXPORTS: exportId, MDVM_CHANGE_SET_EXPORTS: exportId });
  const first = await publishAndLand(stack, app, exportId, { generatedTime: '2026-11-20T06:01:00Z', records: before });
  const second = await publishAndLand(stack, app, exportId, { generatedTime: '2026-11-22T06:01:00Z', records: after });
  expect(second.snapshot).not.toBe(first.snapshot);
  const baseline = await landedChangeSetManifest(app, exportId, first.snapshot);
  expect(baseline.previous).toBeNull();
  expect(baseline.totals.rows).toBe(0);
  const manifest = await landedChangeSetManifest(app, exportId, second.snapshot);
  expect(manifest.previous?.snapshot).toBe(first.snapshot);
  const data = await app.runtime.landing.getBlobClient(manifest.path).downloadToBuffer();
  expect(data.length).toBe(manifest.bytes);
  const rows = gunzipSync(data)
    .toString('utf8')
    .split('\n')
    .filter((l) => l !== '')
    .map((l) => JSON.parse(l) as { Change: string; DeviceId: string; Key: Row; Changed?: Row });
  return { app, manifest, rows, summary: rows.map((r) => `${r.Change} ${Object.values(r.Key).join('|')}`).sort() };
}

const upper = (r: Row): Row =>
  Object.fromEntries(Object.entries(r).map(([k, v]) => [k.charAt(0).toUpperCase() + k.slice(1), v]));

describe('change sets between consecutive snapshots', () => {
  it('secure configuration: checks that flipped, appeared and disappeared per device (casing changes are not changes)', async () => {
    const scid = (deviceId: string, configurationId: string, isCompliant: boolean) => ({
      deviceId,
      rbacGroupId: 12,
      configurationId,
      configurationName: `setting ${configurationId}`,
      isApplicable: true,
      isCompliant,
      timestamp: '2026-11-20 05:00:00.000',
    });
    const { manifest, rows, summary } = await changesBetween(
      'secure-configuration',
      [scid('dev-a', 'scid-1', true), scid('dev-a', 'scid-2', false), scid('dev-b', 'scid-1', true)],
      // The same records in PascalCase, with a later timestamp: only the flip, the new one and the gone one count.
      [
        upper({ ...scid('dev-a', 'scid-1', false), timestamp: '2026-11-22 05:00:00.000' }),
        upper(scid('dev-a', 'scid-2', false)),
        upper(scid('dev-c', 'scid-1', true)),
      ],
    );
    expect(summary).toEqual(['added dev-c|scid-1', 'changed dev-a|scid-1', 'removed dev-b|scid-1']);
    expect(rows.find((r) => r.Change === 'changed')?.Changed).toEqual({ IsCompliant: { from: true, to: false } });
    expect(manifest.totals).toMatchObject({ added: 1, removed: 1, changed: 1, expired: 0, rows: 3, devices: 3 });
  });

  it('software inventory: installed and removed per device; a version change is one removal and one installation', async () => {
    const sw = (deviceId: string, softwareName: string, softwareVersion: string) => ({
      deviceId,
      rbacGroupId: 0,
      softwareVendor: 'vendor',
      softwareName,
      softwareVersion,
      numberOfWeaknesses: 1,
      endOfSupportStatus: 'None',
    });
    const { summary } = await changesBetween(
      'software-inventory',
      [sw('dev-a', 'chrome', '130'), sw('dev-a', '7zip', '24'), sw('dev-b', 'chrome', '130')],
      [sw('dev-a', 'chrome', '131'), sw('dev-a', '7zip', '24'), sw('dev-b', 'chrome', '130'), sw('dev-b', 'jre', '8')],
    );
    expect(summary).toEqual([
      'added dev-a|vendor|chrome|131',
      'added dev-b|vendor|jre|8',
      'removed dev-a|vendor|chrome|130',
    ]);
  });

  it('certificates: added, removed, and expired between the two snapshots', async () => {
    const cert = (deviceId: string, thumbprint: string, notAfter: string) => ({
      deviceId,
      rbacGroupId: 31,
      thumbprint,
      path: `LocalMachine\\My\\${thumbprint}`,
      notAfter,
      keyLength: 2048,
    });
    const { summary } = await changesBetween(
      'certificates',
      [
        cert('dev-a', 'AA', '2026-11-21T00:00:00Z'), // expires between the snapshots
        cert('dev-a', 'BB', '2027-01-01T00:00:00Z'),
        cert('dev-b', 'CC', '2026-01-01T00:00:00Z'), // expired before both: not news
        cert('dev-b', 'DD', '2027-01-01T00:00:00Z'),
      ],
      [
        cert('dev-a', 'AA', '2026-11-21T00:00:00Z'),
        cert('dev-a', 'BB', '2027-01-01T00:00:00Z'),
        cert('dev-b', 'CC', '2026-01-01T00:00:00Z'),
        cert('dev-b', 'EE', '0001-01-01T00:00:00Z'),
      ],
    );
    expect(summary).toEqual([
      'added dev-b|EE|LocalMachine\\My\\EE',
      'expired dev-a|AA|LocalMachine\\My\\AA',
      'removed dev-b|DD|LocalMachine\\My\\DD',
    ]);
  });

  it('browser extensions: a new version and a disabled extension are changes; duplicates are counted once', async () => {
    const ext = (DeviceId: string, ExtensionId: string, ExtensionVersion: string, IsActivated: boolean) => ({
      DeviceId,
      RbacGroupId: 12,
      BrowserName: 'edge',
      ExtensionId,
      ExtensionVersion,
      IsActivated,
      ExtensionRisk: 'Low',
    });
    const { manifest, summary } = await changesBetween(
      'browser-extensions',
      [ext('dev-a', 'x1', '1.0', true), ext('dev-a', 'x2', '2.0', true), ext('dev-a', 'x2', '2.0', true)],
      [ext('dev-a', 'x1', '1.1', true), ext('dev-a', 'x2', '2.0', false)],
    );
    expect(summary).toEqual(['changed dev-a|edge|x1', 'changed dev-a|edge|x2']);
    expect(manifest.totals.duplicateKeys).toBe(1);
  });

  it('a duplicate change-set message returns the manifest already written', async () => {
    const { app, manifest } = await changesBetween(
      'software-inventory-noncpe',
      [{ deviceId: 'd', softwareVendor: 'v', softwareName: 'n', softwareVersion: '1' }],
      [{ deviceId: 'd', softwareVendor: 'v', softwareName: 'n', softwareVersion: '2' }],
    );
    const path = changesManifestPath('software-inventory-noncpe', manifest.snapshot);
    const etag = (await app.runtime.landing.getBlobClient(path).getProperties()).etag;
    const again = await handleDeriveMessage(app.runtime, quiet(), {
      v: 1,
      kind: 'change-set',
      export: 'software-inventory-noncpe',
      snapshot: manifest.snapshot,
    });
    expect(again.outcome).toBe('duplicate');
    expect((await app.runtime.landing.getBlobClient(path).getProperties()).etag).toBe(etag);
  });
});
