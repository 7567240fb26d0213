import { createHash, randomBytes } from 'node:crypto';
import { Readable } from 'node:stream';
import { gzipSync } from 'node:zlib';
import { afterAll, beforeAll, expect, it } from 'vitest';
import type { SnapshotManifest } from '../../src/core/contracts.js';
import type { Runtime } from '../../src/core/runtime.js';
import { Telemetry } from '../../src/core/telemetry.js';
import { buildChangeSet, ChangeWriter } from '../../src/derive/changeSets.js';
import {
  changeSetManifestSchema,
  changesManifestPath,
  curatedManifestPath,
  curatedManifestSchema,
  sourceDigest,
} from '../../src/derive/contracts.js';
import { completeCuratedIfReady, curatePart } from '../../src/derive/curate.js';
import { enqueueDerivations, handleDeriveMessage } from '../../src/derive/derive.js';
import {
  createApp,
  landedChangeSetManifest,
  latestRawManifest,
  publishAndLand,
  readLandedJson,
  type Stack,
  startStack,
} from '../helpers/stack.js';

/**
 * Derived data under races and failures found in review: a slow delivery from before the raw manifest grew, a crash
 * between a change set's data and its manifest, uploads that fail mid-file.
 */
let stack: Stack;
beforeAll(async () => {
  stack = await startStack();
});
afterAll(async () => {
  await stack?.stop();
});
const quiet = () => new Telemetry({ info() {}, warn() {}, error() {} });
/** v1 complete with derived data; then Defender lists one more file, v2 complete with derived data rebuilt. */
async function grownSnapshot(
  generatedTime: string,
  extra: { emptyPart?: boolean; largePartRecords?: number } = { emptyPart: true },
) {
  const app = await createApp(stack, {
    MDVM_EXPORTS: 'certificates',
    MDVM_CURATED_EXPORTS: 'certificates',
    MDVM_CHANGE_SET_EXPORTS: 'certificates',
  });
  await publishAndLand(stack, app, 'certificates', { generatedTime: '2026-11-19T10:01:00Z', recordsPerPart: 10 });
  const v1 = await publishAndLand(stack, app, 'certificates', { generatedTime, recordsPerPart: 10 });
  const v2 = await publishAndLand(stack, app, 'certificates', { generatedTime, recordsPerPart: 10, ...extra });
  expect(v2.parts.length).toBe(v1.parts.length + 1);
  return { app, v1, v2 };
}

it('a slow curate delivery that read the raw manifest before it grew does not put its stale manifest back', async () => {
  const { app, v1, v2 } = await grownSnapshot('2026-11-21T10:01:00Z');
  const path = curatedManifestPath('certificates', v2.snapshot);
  expect(curatedManifestSchema.parse(await readLandedJson(app, path)).parts.length).toBe(v2.parts.length);
  // handleDeriveMessage read v1 (readRawManifest), then spent minutes in curatePart; v2's messages all finished meanwhile.
  await completeCuratedIfReady(app.runtime, quiet(), v1);
  const now = curatedManifestSchema.parse(await readLandedJson(app, path));
  expect(
    now.parts.map((p) => p.source),
    'curated manifest lists every part of the current raw manifest',
  ).toEqual(v2.parts.map((p) => p.path));
});

it('a slow change-set delivery from before the raw manifest grew does not put its stale change set back', async () => {
  const { app, v1, v2 } = await grownSnapshot('2026-11-21T11:01:00Z');
  await buildChangeSet(app.runtime, quiet(), v1);
  const m = await landedChangeSetManifest(app, 'certificates', v2.snapshot);
  const raw = await latestRawManifest(app, 'certificates');
  expect(raw.parts.length).toBe(v2.parts.length);
  expect(m.sourceDigest, 'change set digest = current raw manifest digest').toBe(sourceDigest(raw.parts));
});

it("a crash between a stale change set's data and its manifest never leaves the manifest naming other bytes", async () => {
  const { app, v1, v2 } = await grownSnapshot('2026-11-21T12:01:00Z', { largePartRecords: 7 });
  const manifestPath = changesManifestPath('certificates', v2.snapshot);
  // Make v1's data differ from v2's: v2 has one more (empty) part, so make the stale build compare against nothing.
  // (Simplest different input: the stale delivery ran when the previous snapshot's row was not yet visible.)
  const crashing = new Proxy(app.runtime, {
    get(target, prop, receiver) {
      if (prop === 'landing') {
        const landing = target.landing;
        return new Proxy(landing, {
          get(l, p) {
            if (p === 'getBlockBlobClient') {
              return (name: string) => {
                const client = l.getBlockBlobClient(name);
                if (name !== manifestPath) return client;
                return new Proxy(client, {
                  get(c, q) {
                    if (q === 'upload')
                      return async () => {
                        throw new Error('process killed');
                      };
                    const v = Reflect.get(c, q);
                    return typeof v === 'function' ? v.bind(c) : v;
                  },
                });
              };
            }
            const v = Reflect.get(l, p);
            return typeof v === 'function' ? v.bind(l) : v;
          },
        });
      }
      return Reflect.get(target, prop, receiver);
    },
  }) as Runtime;
  await buildChangeSet(crashing, quiet(), v1).catch(() => undefined);
  // The message is redelivered: it reads the (v2) raw manifest, finds a change set with that digest, and stops.
  const again = await handleDeriveMessage(app.runtime, quiet(), {
    v: 1,
    kind: 'change-set',
    export: 'certificates',
    snapshot: v2.snapshot,
  });
  expect(again.outcome).toBe('duplicate');
  const m = changeSetManifestSchema.parse(await readLandedJson(app, manifestPath));
  const data = await app.runtime.landing.getBlobClient(m.path).downloadToBuffer();
  expect(
    { bytes: data.length, md5: createHash('md5').update(data).digest('base64') },
    'data blob = what its manifest says',
  ).toEqual({
    bytes: m.bytes,
    md5: m.md5,
  });
});

it('a change set whose block upload fails stops with an error instead of waiting forever', async () => {
  let staged = 0;
  const dest = {
    containerName: 'landing',
    stageBlock: async () => {
      staged++;
      await new Promise((r) => setTimeout(r, 20));
      throw Object.assign(new Error('The server is busy'), { statusCode: 503 });
    },
    commitBlockList: async () => ({}),
  };
  const runtime = { landing: { getBlockBlobClient: () => dest } } as unknown as Runtime;
  const out = new ChangeWriter(runtime, 'changes/x/changes.json.gz');
  let rows = 0;
  const writing = (async () => {
    // Incompressible rows, paced like a change-set pass (each row follows a record read).
    for (; rows < 200_000; rows++) {
      await out.write({
        Change: 'added',
        DeviceId: 'd',
        Key: {},
        Record: { x: randomBytes(4096).toString('hex') },
      } as never);
      await new Promise((r) => setTimeout(r, 1));
    }
    await out.close();
  })();
  const outcome = await Promise.race([
    writing.then(
      () => 'resolved',
      (e: Error) => `rejected: ${e.message}`,
    ),
    new Promise((r) => setTimeout(() => r('still pending after 10 s'), 10_000)),
  ]);
  expect(outcome).toMatch(/^rejected/);
  expect(staged).toBeGreaterThan(0);
}, 20_000);

it('curatePart rejects (and does not crash the process) when staging a Parquet block fails', async () => {
  const lines = Array.from({ length: 30_000 }, (_, i) =>
    JSON.stringify({ deviceId: `d${i}`, softwareName: randomBytes(300).toString('base64') }),
  ).join('\n');
  const gz = gzipSync(lines);
  const rawPath = 'software-inventory/snapshot=2026-11-21T0601Z/part-00000.json.gz';
  const manifest = {
    v: 1,
    export: 'software-inventory',
    snapshot: '2026-11-21T0601Z',
    generatedTime: '2026-11-21T06:01:00Z',
    parts: [
      {
        path: rawPath,
        part: 'part-00000.json.gz',
        bytes: gz.length,
        md5: createHash('md5').update(gz).digest('base64'),
        records: null,
        verification: null,
      },
    ],
  } as unknown as SnapshotManifest;
  let staged = 0;
  const dest = {
    containerName: 'landing',
    stageBlock: async () => {
      staged++;
      await new Promise((r) => setTimeout(r, 10));
      throw Object.assign(new Error('Server busy'), { statusCode: 503 });
    },
    commitBlockList: async () => ({}),
  };
  const runtime = {
    landing: {
      getBlockBlobClient: () => dest,
      getBlobClient: (path: string) => ({
        getProperties: async () => {
          throw Object.assign(new Error('nf'), { statusCode: 404 });
        },
        download: async () => ({
          readableStreamBody: Readable.from([gz.subarray(0, gz.length >> 1), gz.subarray(gz.length >> 1)]),
        }),
        path,
      }),
    },
  } as unknown as Runtime;
  const uncaught: unknown[] = [];
  const onUncaught = (e: unknown) => uncaught.push(e);
  process.prependListener('uncaughtException', onUncaught);
  const outcome = await Promise.race([
    curatePart(runtime, new Telemetry({ info() {}, warn() {}, error() {} }), manifest, rawPath).then(
      () => 'resolved',
      (e: Error) => `rejected: ${e.message}`,
    ),
    new Promise((r) => setTimeout(() => r('pending after 10 s'), 10_000)),
  ]);
  await new Promise((r) => setTimeout(r, 200));
  process.off('uncaughtException', onUncaught);
  expect(outcome).toMatch(/^rejected/);
  expect(staged).toBeGreaterThan(0);
  expect(uncaught).toEqual([]);
}, 30_000);

it("when an older snapshot completes again with more files, the next snapshot's change set is built again against it", async () => {
  const app = await createApp(stack, { MDVM_EXPORTS: 'certificates', MDVM_CHANGE_SET_EXPORTS: 'certificates' });
  const manifests: SnapshotManifest[] = [];
  for (const generatedTime of ['2026-11-18T06:01:00Z', '2026-11-18T12:01:00Z']) {
    manifests.push(await publishAndLand(stack, app, 'certificates', { generatedTime, recordsPerPart: 5 }));
  }
  const [older, newer] = manifests as [SnapshotManifest, SnapshotManifest];
  const before = await landedChangeSetManifest(app, 'certificates', newer.snapshot);
  expect(before.previous?.sourceDigest).toBe(sourceDigest(older.parts));

  // The older snapshot gains a part (as when Defender lists more files for it) and completes again.
  const extra = gzipSync(
    `${JSON.stringify({ deviceId: 'late-device', thumbprint: 'FF', path: 'LocalMachine\\My\\FF' })}\n`,
  );
  const extraPath = `certificates/snapshot=${older.snapshot}/OrgId=late/_RbacGroupId=0/part-00009-late.c000.json.gz`;
  await app.runtime.landing.getBlockBlobClient(extraPath).uploadData(extra);
  const grown: SnapshotManifest = {
    ...older,
    totals: { ...older.totals, parts: older.totals.parts + 1, bytes: older.totals.bytes + extra.length, records: null },
    parts: [
      ...older.parts,
      {
        path: extraPath,
        part: 'OrgId=late/_RbacGroupId=0/part-00009-late.c000.json.gz',
        bytes: extra.length,
        md5: createHash('md5').update(extra).digest('base64'),
        records: null,
        verification: 'md5',
      },
    ],
  };
  const grownText = `${JSON.stringify(grown, null, 2)}\n`;
  await app.runtime.landing
    .getBlockBlobClient(`certificates/snapshot=${older.snapshot}/_manifest.json`)
    .upload(grownText, Buffer.byteLength(grownText));
  expect(await enqueueDerivations(app.runtime, grown)).toBe(2);
  await app.runner.drain();

  const after = await landedChangeSetManifest(app, 'certificates', newer.snapshot);
  expect(after.previous?.sourceDigest).toBe(sourceDigest(grown.parts));
  expect(after.path).not.toBe(before.path);
  // The late device is in the older snapshot only: the newer snapshot's change set now reports it removed.
  const dataBytes = (await app.runtime.landing.getBlobClient(after.path).downloadToBuffer()).length;
  expect(dataBytes).toBe(after.bytes);
  expect(after.totals.removed).toBe(before.totals.removed + 1);
});
