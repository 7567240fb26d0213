import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { completeSnapshotIfReady } from '../../src/core/completion.js';
import { encodeKey, partsPartitionKey } from '../../src/core/parts.js';
import { Telemetry } from '../../src/core/telemetry.js';
import { verifyLanding } from '../../src/ops/verify.js';
import { createApp, type Stack, startStack } from '../helpers/stack.js';

let stack: Stack;
beforeAll(async () => {
  stack = await startStack();
});
afterAll(async () => {
  await stack?.stop();
});

const quiet = new Telemetry({ info: () => {}, warn: () => {}, error: () => {} });
const GENERATED = '2026-11-20T06:01:00.000Z';
const SNAPSHOT = '2026-11-20T0601Z';
const PART = 'OrgId=o/_RbacGroupId=1/part-00000.json.gz';
/** A landed part row without `bytes`: what a corrupting hand or an old bug could leave. */
const LANDED_WITHOUT_BYTES = {
  exportId: 'certificates',
  snapshotId: SNAPSHOT,
  path: PART,
  sourcePath: `https://ms.blob.core.windows.net/export/${PART}`,
  landingPath: `certificates/snapshot=${SNAPSHOT}/${PART}`,
  status: 'landed' as const,
  attempts: 1,
  verification: 'length' as const,
  landedAt: GENERATED,
};

describe('every row and blob is read through its contract', () => {
  it('completion refuses a landed part row without bytes, naming it, and writes no manifest', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'certificates' });
    const { snapshotsTable, partsTable } = app.runtime.storage;
    // Rows as a corrupting hand (or an old bug) could leave them: written past the store, which would refuse.
    await snapshotsTable.createEntity({
      partitionKey: 'certificates',
      rowKey: GENERATED,
      snapshotId: SNAPSHOT,
      status: 'copying',
      partCount: 1,
      partsLanded: 1,
      bytesLanded: 10,
      requestedAt: GENERATED,
      lastRequestedAt: GENERATED,
    });
    await partsTable.createEntity({
      partitionKey: partsPartitionKey('certificates', SNAPSHOT),
      rowKey: encodeKey(PART),
      ...LANDED_WITHOUT_BYTES,
    });

    const completion = completeSnapshotIfReady(app.runtime, quiet, 'certificates', GENERATED);
    await expect(completion).rejects.toMatchObject({ kind: 'fatal' });
    await expect(completeSnapshotIfReady(app.runtime, quiet, 'certificates', GENERATED)).rejects.toThrow(
      /parts row certificates_2026-11-20T0601Z\/OrgId=o\/_RbacGroupId=1\/part-00000\.json\.gz breaks its contract .*bytes: required when the part is landed/,
    );
    const written = [];
    for await (const blob of app.runtime.landing.listBlobsFlat({ prefix: 'certificates/' })) written.push(blob.name);
    expect(written).toEqual([]);
    expect((await app.runtime.store.getSnapshot('certificates', GENERATED))?.value.status).toBe('copying');
  });

  it('the store refuses to write a row that breaks its contract', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'certificates' });
    const insert = app.runtime.store.insertParts([LANDED_WITHOUT_BYTES]);
    await expect(insert).rejects.toThrow(/refusing to write a parts row .* bytes: required when the part is landed/);
    const rows = [];
    for await (const row of app.runtime.storage.partsTable.listEntities()) rows.push(row);
    expect(rows).toEqual([]);
  });

  it('verify reports a _manifest.json that breaks its contract', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'certificates' });
    await stack.simulator.publish('certificates', { generatedTime: GENERATED, recordsPerPart: 5 });
    await app.runner.tick();
    await app.runner.drain();
    const manifest = app.runtime.landing.getBlockBlobClient(`certificates/snapshot=${SNAPSHOT}/_manifest.json`);
    const original = JSON.parse((await manifest.downloadToBuffer()).toString('utf8'));
    const forged = JSON.stringify({ ...original, totals: { ...original.totals, bytes: original.totals.bytes + 1 } });
    await manifest.upload(forged, Buffer.byteLength(forged));
    const report = await verifyLanding(app.runtime, { exports: ['certificates'] });
    expect(report.findings).toContainEqual(
      expect.objectContaining({
        kind: 'no-manifest',
        detail: expect.stringMatching(/breaks its contract: totals\.bytes/),
      }),
    );
  });
});
