import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { InvocationContext } from '@azure/functions';
import type { ContainerClient } from '@azure/storage-blob';
import { DuckDBInstance } from '@duckdb/node-api';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { MdvmError } from '../../src/core/errors.js';
import type { Runtime } from '../../src/core/runtime.js';
import { Telemetry } from '../../src/core/telemetry.js';
import { ChangeWriter } from '../../src/derive/changeSets.js';
import { changesFolder, curatedPartPath } from '../../src/derive/contracts.js';
import { curatePart } from '../../src/derive/curate.js';
import { DERIVE_FUNCTION_NAME, type QueueFunctionSpec } from '../../src/functions/specs.js';
import {
  createApp,
  landedChangeSetManifest,
  landedCuratedManifest,
  latestRawManifest,
  md5,
  publishAndLand,
  type Stack,
  startStack,
  type TestApp,
} from '../helpers/stack.js';

/**
 * Derived data against what review found could break it: two deliveries of one change set at the same moment, a raw
 * part with a line too long to hold, whitespace-only lines, very large records, a message too big to park as it came.
 */
let stack: Stack;
let folder: string;
beforeAll(async () => {
  stack = await startStack();
  folder = mkdtempSync(join(tmpdir(), 'mdvm-derive-hostile-'));
});
afterAll(async () => {
  await stack?.stop();
  rmSync(folder, { recursive: true, force: true });
});

/** The documented limits (docs/downstream/README.md), spelled out so the tests check them, not echo them. */
const MAX_LINE_BYTES = 32 * 1024 * 1024;
const ROW_GROUP_RAW_BYTES = 16 * 1024 * 1024;

const quiet = () => new Telemetry({ info() {}, warn() {}, error() {} });

/** The derive function as the Functions host calls it, with a real InvocationContext. */
function deriveHandler(app: TestApp): (message: unknown) => Promise<void> {
  const spec = app.runner.functions.find((f): f is QueueFunctionSpec => f.name === DERIVE_FUNCTION_NAME);
  if (!spec) throw new Error('no derive function registered');
  return (message) =>
    spec.handler(
      message,
      new InvocationContext({ invocationId: crypto.randomUUID(), functionName: DERIVE_FUNCTION_NAME }),
    );
}

async function parkedReasons(app: TestApp): Promise<string[]> {
  const parked = await app.runtime.storage.derivePoisonQueue.peekMessages({ numberOfMessages: 32 });
  return parked.peekedMessageItems.map(
    (m) => (JSON.parse(Buffer.from(m.messageText, 'base64').toString('utf8')) as { reason: string }).reason,
  );
}

const cert = (deviceId: string, thumbprint: string) => ({
  deviceId,
  rbacGroupId: 0,
  thumbprint,
  path: `LocalMachine\\My\\${thumbprint}`,
  notAfter: '2027-01-01T00:00:00Z',
  keyLength: 2048,
});

/**
 * One certificates snapshot whose only part holds exactly `lines` (joined with `\n`), landed through the real copy
 * with the record counter on, and the derive queue left for the test to drain.
 */
async function landLines(lines: readonly string[], generatedTime: string) {
  const app = await createApp(stack, {
    MDVM_EXPORTS: 'certificates',
    MDVM_COPY_MODE: 'stream',
    MDVM_COUNT_RECORDS: 'true',
    MDVM_CURATED_EXPORTS: 'certificates',
  });
  const published = await stack.simulator.publish('certificates', { generatedTime, records: [cert('d0', 'A0')] });
  const [part] = published.parts;
  if (!part || published.parts.length !== 1) throw new Error('expected one source part');
  await stack.simulator
    .sourceContainer(published)
    .getBlockBlobClient(part.blobName)
    .uploadData(gzipSync(Buffer.from(lines.join('\n'))));
  stack.simulator.resetRateLimits();
  await app.runner.tick();
  await app.runner.drain({ only: 'parts' });
  return { app, raw: await latestRawManifest(app, 'certificates') };
}

it('two deliveries of one change-set message at the same moment both end landed or duplicate; none is parked', async () => {
  // Both deliveries stage their blocks, then commit one after the other: the interleaving that made the second
  // commit fail with InvalidBlockList (Put Block List drops the blocks the first commit left out).
  let armed = false;
  const commits: { waiting: (() => void)[]; arrived: number; first?: Promise<unknown> } = { waiting: [], arrived: 0 };
  const isChangeData = (name: string) => name.startsWith('changes/') && name.endsWith('.json.gz');
  const barrier = (runtime: Runtime): Runtime => {
    const landing = new Proxy(runtime.landing, {
      get(target, prop) {
        if (prop === 'getBlockBlobClient') {
          return (name: string) => {
            const client = target.getBlockBlobClient(name);
            if (!isChangeData(name)) return client;
            return new Proxy(client, {
              get(c, q) {
                if (q === 'commitBlockList') {
                  return async (...args: Parameters<typeof c.commitBlockList>) => {
                    if (!armed) return c.commitBlockList(...args);
                    const arrival = ++commits.arrived;
                    if (arrival === 1) {
                      await new Promise<void>((resolve) => {
                        commits.waiting.push(resolve);
                        setTimeout(resolve, 15_000);
                      });
                      commits.first = c.commitBlockList(...args);
                      return commits.first;
                    }
                    for (const release of commits.waiting) release();
                    while (!commits.first) await new Promise((r) => setTimeout(r, 5));
                    await commits.first.catch(() => undefined);
                    return c.commitBlockList(...args);
                  };
                }
                const value = Reflect.get(c, q);
                return typeof value === 'function' ? value.bind(c) : value;
              },
            });
          };
        }
        const value = Reflect.get(target, prop);
        return typeof value === 'function' ? value.bind(target) : value;
      },
    }) as ContainerClient;
    return { ...runtime, landing };
  };
  const app = await createApp(
    stack,
    { MDVM_EXPORTS: 'certificates', MDVM_DERIVE_CONCURRENCY: '2' },
    {
      wrapRuntime: barrier,
    },
  );
  await publishAndLand(stack, app, 'certificates', { generatedTime: '2026-11-23T06:01:00Z', recordsPerPart: 10 });
  const newer = await publishAndLand(stack, app, 'certificates', {
    generatedTime: '2026-11-23T12:01:00Z',
    recordsPerPart: 10,
  });
  armed = true;
  const handler = deriveHandler(app);
  const message = { v: 1, kind: 'change-set', export: 'certificates', snapshot: newer.snapshot };
  const settled = await Promise.allSettled([handler(message), handler(message)]);
  expect(commits.arrived, 'both deliveries reached their commit').toBe(2);
  expect(settled.map((s) => (s.status === 'rejected' ? String(s.reason) : s.status))).toEqual([
    'fulfilled',
    'fulfilled',
  ]);
  expect(await parkedReasons(app)).toEqual([]);
  expect(app.events.filter((e) => e.event === 'derived' && e.outcome === 'dead-lettered')).toEqual([]);

  const manifest = await landedChangeSetManifest(app, 'certificates', newer.snapshot);
  const data = await app.runtime.landing.getBlobClient(manifest.path).downloadToBuffer();
  expect({ bytes: data.length, md5: md5(data) }, 'data blob = what its manifest says').toEqual({
    bytes: manifest.bytes,
    md5: manifest.md5,
  });
  const names: string[] = [];
  for await (const b of app.runtime.landing.listBlobsFlat({
    prefix: `${changesFolder('certificates', newer.snapshot)}/`,
  }))
    names.push(b.name);
  expect(names.sort()).toEqual(
    [manifest.path, `${changesFolder('certificates', newer.snapshot)}/_manifest.json`].sort(),
  );
});

it('a raw part with a line longer than the cap is parked with a reason naming the line; nothing is written', async () => {
  const long = JSON.stringify({ ...cert('d1', 'A1'), padding: 'x'.repeat(MAX_LINE_BYTES) });
  const { app, raw } = await landLines(
    [JSON.stringify(cert('d0', 'A0')), long, JSON.stringify(cert('d2', 'A2'))],
    '2026-11-23T07:01:00Z',
  );
  expect(raw.parts[0]?.records).toBe(3);
  await app.runner.drain({ only: 'derive' });
  const reasons = await parkedReasons(app);
  expect(reasons).toHaveLength(1);
  expect(reasons[0]).toMatch(/: line 2 is longer than 32 MiB$/);
  expect(reasons[0]).toContain(raw.parts[0]?.path ?? '-');
  const names: string[] = [];
  for await (const b of app.runtime.landing.listBlobsFlat({ prefix: 'curated/' })) names.push(b.name);
  expect(names).toEqual([]);
});

it('whitespace-only lines count as records like the copy counts them, and are dropped from the curated rows', async () => {
  // The copy's counter: a line counts when it is not empty once one trailing \r is taken off.
  const lines = [
    JSON.stringify(cert('d0', 'A0')),
    '   ',
    JSON.stringify(cert('d1', 'A1')),
    '',
    '\r',
    `${JSON.stringify(cert('d2', 'A2'))}\r`,
    '\t\r',
    '',
  ];
  const { app, raw } = await landLines(lines, '2026-11-23T08:01:00Z');
  const [part] = raw.parts;
  expect(part?.records, 'the copy counted every non-empty line').toBe(5);
  if (!part) throw new Error('no part');

  // A manifest that counted otherwise is refused, saying what was counted.
  const miscounted = { ...raw, parts: [{ ...part, records: 4 }] };
  await expect(curatePart(app.runtime, quiet(), miscounted, part.path)).rejects.toThrow(
    /5 non-empty lines \(2 of them whitespace only\), but the manifest counted 4 records/,
  );

  await app.runner.drain({ only: 'derive' });
  expect(await parkedReasons(app)).toEqual([]);
  const curated = await landedCuratedManifest(app, 'certificates', raw.snapshot);
  expect(curated.parts.map((p) => p.rows)).toEqual([3]);
  const file = join(folder, `${app.suffix}.parquet`);
  writeFileSync(file, await app.runtime.landing.getBlobClient(curatedPartPath(part.path)).downloadToBuffer());
  const db = await DuckDBInstance.create(':memory:');
  const sql = await db.connect();
  try {
    const read = await sql.runAndReadAll(`select DeviceId from read_parquet('${file}')`);
    expect(read.getRowObjectsJS().map((r) => r.DeviceId)).toEqual(['d0', 'd1', 'd2']);
  } finally {
    sql.closeSync();
    db.closeSync();
  }
});

it('large records are written in row groups of at most about 16 MiB of raw JSON, not a fixed number of rows', async () => {
  const app = await createApp(stack, { MDVM_EXPORTS: 'certificates', MDVM_CURATED_EXPORTS: 'certificates' });
  const record = (i: number) => ({ ...cert(`d${i}`, `T${i}`), padding: 'p'.repeat(20 * 1024) });
  const lineBytes = Buffer.byteLength(JSON.stringify(record(1000)));
  // Two and a half groups' worth: far fewer rows than a row-count limit would ever cut at.
  const records = Array.from({ length: Math.ceil((2.5 * ROW_GROUP_RAW_BYTES) / lineBytes) }, (_, i) =>
    record(1000 + i),
  );
  const raw = await publishAndLand(stack, app, 'certificates', { generatedTime: '2026-11-23T09:01:00Z', records });
  const [part] = raw.parts;
  if (!part) throw new Error('no part');
  const file = join(folder, `${app.suffix}-large.parquet`);
  writeFileSync(file, await app.runtime.landing.getBlobClient(curatedPartPath(part.path)).downloadToBuffer());
  const db = await DuckDBInstance.create(':memory:');
  const sql = await db.connect();
  try {
    const groups = await sql.runAndReadAll(
      `select distinct row_group_id, row_group_num_rows from parquet_metadata('${file}') order by row_group_id`,
    );
    const rowsPerGroup = groups.getRowObjectsJS().map((r) => Number(r.row_group_num_rows));
    expect(rowsPerGroup.reduce((a, b) => a + b, 0)).toBe(records.length);
    expect(rowsPerGroup.length).toBeGreaterThanOrEqual(3);
    // Each group stops at the row that takes its raw bytes to the cap.
    for (const rows of rowsPerGroup) expect((rows - 1) * lineBytes).toBeLessThan(ROW_GROUP_RAW_BYTES);
    for (const rows of rowsPerGroup.slice(0, -1)) expect(rows * lineBytes).toBeGreaterThanOrEqual(ROW_GROUP_RAW_BYTES);
  } finally {
    sql.closeSync();
    db.closeSync();
  }
});

it('a derive message too large to park as it came is parked cut to fit the queue, with its reason', async () => {
  const app = await createApp(stack, { MDVM_EXPORTS: 'certificates' });
  // 42 KB of backslashes: JSON escaping doubles them in the dead letter, base64 adds a third.
  const message = { v: 1, kind: 'change-set', export: '\\'.repeat(21_000), snapshot: '2026-11-23T1001Z' };
  await deriveHandler(app)(message);
  const reasons = await parkedReasons(app);
  expect(reasons).toHaveLength(1);
  expect(reasons[0]).toMatch(/derive schema.*\(original cut to \d+ of \d+ characters\)$/);
});

it('a change-set commit whose blocks another delivery dropped (InvalidBlockList) goes on only when the blob is ours', async () => {
  const writeThrough = async (existing: (ours: Buffer) => { contentLength: number; contentMD5: Buffer }) => {
    const staged: Buffer[] = [];
    const dest = {
      name: 'changes/x/snapshot=2026-11-23T1101Z/changes-0.json.gz',
      containerName: 'landing',
      stageBlock: async (_id: string, body: Buffer) => {
        staged.push(Buffer.from(body));
        return {};
      },
      commitBlockList: async () => {
        throw Object.assign(new Error('The specified block list is invalid.'), {
          statusCode: 400,
          code: 'InvalidBlockList',
        });
      },
      getProperties: async () => existing(Buffer.concat(staged)),
    };
    const runtime = { landing: { getBlockBlobClient: () => dest } } as unknown as Runtime;
    const out = new ChangeWriter(runtime, dest.name);
    await out.write({ Change: 'added', DeviceId: 'd', Key: { DeviceId: 'd' }, Record: { DeviceId: 'd' } });
    return { closing: out.close(), staged };
  };
  const same = await writeThrough((ours) => ({
    contentLength: ours.length,
    contentMD5: createHash('md5').update(ours).digest(),
  }));
  const result = await same.closing;
  const ours = Buffer.concat(same.staged);
  expect(result, 'the blob there is ours byte for byte: go on').toEqual({ bytes: ours.length, md5: md5(ours) });

  const other = await writeThrough((theirs) => ({ contentLength: theirs.length + 1, contentMD5: Buffer.alloc(16) }));
  const error = await other.closing.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(error).toBeInstanceOf(MdvmError);
  expect(error).toMatchObject({
    kind: 'transient',
    message: expect.stringMatching(/committed by another delivery with other bytes/),
  });
});
