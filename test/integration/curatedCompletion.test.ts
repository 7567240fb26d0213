import type { ContainerClient } from '@azure/storage-blob';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { runBounded } from '../../src/core/concurrency.js';
import { manifestSchema, type SnapshotManifest } from '../../src/core/contracts.js';
import { manifestPath } from '../../src/core/parts.js';
import { Telemetry } from '../../src/core/telemetry.js';
import { curatedManifestPath, curatedPartPath } from '../../src/derive/contracts.js';
import { completeCuratedIfReady } from '../../src/derive/curate.js';
import { createApp, type Stack, startStack } from '../helpers/stack.js';

/**
 * The check every curate delivery makes ("are all parts curated?"), at a size where listing the whole folder on
 * each delivery would make a snapshot's derive quadratic.
 */
let stack: Stack;
beforeAll(async () => {
  stack = await startStack();
});
afterAll(async () => {
  await stack?.stop();
});
/** The landing container, counting the blob names its listings hand back. */
function countingListings(landing: ContainerClient): { landing: ContainerClient; listed: () => number } {
  let listed = 0;
  const wrapped = new Proxy(landing, {
    get(target, prop) {
      const value = Reflect.get(target, prop, target) as unknown;
      if (prop !== 'listBlobsFlat') return typeof value === 'function' ? value.bind(target) : value;
      return (...args: Parameters<ContainerClient['listBlobsFlat']>) => {
        const listing = target.listBlobsFlat(...args);
        return {
          async *[Symbol.asyncIterator]() {
            for await (const blob of listing) {
              listed++;
              yield blob;
            }
          },
          byPage: (settings?: Parameters<typeof listing.byPage>[0]) =>
            (async function* () {
              for await (const page of listing.byPage(settings)) {
                listed += page.segment.blobItems.length;
                yield page;
              }
            })(),
        };
      };
    },
  });
  return { landing: wrapped, listed: () => listed };
}
const quiet = () => new Telemetry({ info() {}, warn() {}, error() {} });
const PARTS = 1_500;

function manifestOf(snapshot: string): SnapshotManifest {
  // Part numbers in an order other than the names' order, as Defender's files come.
  const parts = Array.from({ length: PARTS }, (_, i) => {
    const part = `OrgId=o/_RbacGroupId=${i % 3}/part-${String((i * 7919) % PARTS).padStart(5, '0')}-j.c000.json.gz`;
    return {
      path: `certificates/snapshot=${snapshot}/${part}`,
      part,
      bytes: 100 + i,
      md5: Buffer.from(`md5-${i}`).toString('base64'),
      records: 1,
      verification: 'md5' as const,
    };
  });
  return manifestSchema.parse({
    v: 1,
    export: 'certificates',
    exportTitle: 'Certificate inventory',
    snapshot,
    generatedTime: '2026-11-25T01:01:00Z',
    completedAt: '2026-11-25T01:05:00Z',
    totals: { parts: parts.length, bytes: parts.reduce((s, p) => s + p.bytes, 0), records: parts.length },
    parts,
  });
}

it('a delivery that is not the last stops listing at the first part not curated yet; the last one writes the manifest', async () => {
  let counting: ReturnType<typeof countingListings> | undefined;
  const app = await createApp(
    stack,
    { MDVM_EXPORTS: 'certificates', MDVM_CURATED_EXPORTS: 'certificates' },
    {
      wrapRuntime: (real) => {
        counting = countingListings(real.landing);
        return { ...real, landing: counting.landing };
      },
    },
  );
  const listed = () => counting?.listed() ?? Number.NaN;
  const manifest = manifestOf('2026-11-25T0101Z');
  await app.runtime.landing
    .getBlockBlobClient(manifestPath('certificates', manifest.snapshot))
    .upload(JSON.stringify(manifest), JSON.stringify(manifest).length);
  const curated = manifest.parts.map((p) => ({ raw: p, path: curatedPartPath(p.path) }));
  const sorted = [...curated].sort((a, b) => (a.path < b.path ? -1 : 1));
  const late = sorted[5];
  if (!late) throw new Error('expected parts');
  // Every part curated but one near the start of the listing; a stray blob in the folder besides.
  await runBounded([...curated.filter((c) => c !== late), { path: `${sorted[2]?.path}.tmp` }], 32, async (c) => {
    const source = 'raw' in c ? `md5:${c.raw.md5}` : 'x';
    await app.runtime.landing.getBlockBlobClient(c.path).upload('p', 1, { metadata: { rows: '1', source } });
  });

  const before = listed();
  expect(await completeCuratedIfReady(app.runtime, quiet(), manifest)).toBeUndefined();
  // One page at most, not the folder's 1,500 names.
  expect(listed() - before).toBeLessThanOrEqual(1_000);

  await app.runtime.landing
    .getBlockBlobClient(late.path)
    .upload('p', 1, { metadata: { rows: '1', source: `md5:${late.raw.md5}` } });
  const written = await completeCuratedIfReady(app.runtime, quiet(), manifest);
  expect(written?.parts.map((p) => p.source)).toEqual(manifest.parts.map((p) => p.path));
  expect(await app.runtime.landing.getBlobClient(curatedManifestPath('certificates', manifest.snapshot)).exists()).toBe(
    true,
  );
});

it('a part curated from other bytes than the manifest names is not counted, wherever it sorts', async () => {
  const app = await createApp(stack, { MDVM_EXPORTS: 'certificates', MDVM_CURATED_EXPORTS: 'certificates' });
  const manifest = manifestOf('2026-11-25T0201Z');
  const curated = manifest.parts.map((p) => ({ raw: p, path: curatedPartPath(p.path) }));
  const sorted = [...curated].sort((a, b) => (a.path < b.path ? -1 : 1));
  const stale = sorted.at(-1);
  await runBounded(curated, 32, async (c) => {
    const source = c === stale ? 'md5:older-bytes' : `md5:${c.raw.md5}`;
    await app.runtime.landing.getBlockBlobClient(c.path).upload('p', 1, { metadata: { rows: '1', source } });
  });
  expect(await completeCuratedIfReady(app.runtime, quiet(), manifest)).toBeUndefined();
});
