/**
 * `npm run bench`: throughput and peak memory of every copy mode of PartCopier, side by side in one
 * run, against the local limit (a raw upload of the same bytes from memory into Azurite).
 * Benchmarks report; nothing here asserts on time. Azurite copies server-side internally, so the server-side
 * numbers say nothing about Azure (docs/adr/0002).
 */
import { createHash, randomUUID } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { gzipSync } from 'node:zlib';
import {
  BlobSASPermissions,
  BlobServiceClient,
  type ContainerClient,
  generateBlobSASQueryParameters,
  StorageSharedKeyCredential,
} from '@azure/storage-blob';
import { type CopyMethod, type CopyOptions, PartCopier } from '../../src/core/copier.js';
import { type LocalAzurite, startAzurite } from '../../src/local/azurite.js';
import { generateRecords } from '../../src/simulator/records.js';

const MiB = 1024 * 1024;
const TARGET_BYTES = 32 * MiB;
/** ~80 bytes of gzip per software-vulnerabilities record: one member is about 4 MiB compressed. */
const RECORDS_PER_MEMBER = 52_000;
const RUNS = 3;
const SAMPLE_MS = 20;

interface Sample {
  readonly ms: number;
  readonly rssDeltaBytes: number;
  readonly peakHeapBytes: number;
}

interface Row {
  readonly label: string;
  readonly samples: Sample[];
}

/** A real gc when we can get one: global.gc under --expose-gc, otherwise enabled through V8 flags. */
function findGc(): (() => void) | undefined {
  if (typeof global.gc === 'function') return () => global.gc?.();
  try {
    setFlagsFromString('--expose-gc');
    const gc: unknown = runInNewContext('gc');
    if (typeof gc === 'function') return () => (gc as () => void)();
  } catch {
    // no gc: deltas are noisier, still comparable
  }
  return undefined;
}
const gc = findGc();

function settle(): Promise<void> {
  gc?.();
  return new Promise((resolve) => setTimeout(resolve, 50));
}

/** Times `work` and samples process.memoryUsage() every 20 ms while it runs. */
async function measure(work: () => Promise<void>): Promise<Sample> {
  await settle();
  const before = process.memoryUsage();
  let peakRss = before.rss;
  let peakHeap = before.heapUsed;
  const sample = (): void => {
    const now = process.memoryUsage();
    if (now.rss > peakRss) peakRss = now.rss;
    if (now.heapUsed > peakHeap) peakHeap = now.heapUsed;
  };
  const timer = setInterval(sample, SAMPLE_MS);
  const start = performance.now();
  let ms: number;
  try {
    await work();
  } finally {
    ms = performance.now() - start;
    clearInterval(timer);
    sample();
  }
  return { ms, rssDeltaBytes: peakRss - before.rss, peakHeapBytes: peakHeap };
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? (sorted[mid] ?? 0) : ((sorted[mid - 1] ?? 0) + (sorted[mid] ?? 0)) / 2;
}

function buildPart(): { data: Buffer; records: number } {
  const members: Buffer[] = [];
  let bytes = 0;
  let records = 0;
  for (let i = 0; bytes < TARGET_BYTES; i++) {
    const member = gzipSync(generateRecords('software-vulnerabilities', `bench/member-${i}`, 12, RECORDS_PER_MEMBER));
    members.push(member);
    bytes += member.length;
    records += RECORDS_PER_MEMBER;
  }
  // A gzip file may consist of several members; gunzip reads them as one stream.
  return { data: Buffer.concat(members, bytes), records };
}

async function md5OfBlob(container: ContainerClient, name: string): Promise<string> {
  const bytes = await container.getBlobClient(name).downloadToBuffer();
  return createHash('md5').update(bytes).digest('base64');
}

const base: CopyOptions = {
  mode: 'server',
  singleShotMaxBytes: 256 * MiB,
  blockSizeBytes: 4 * MiB,
  blockConcurrency: 8,
  streamBufferBytes: 4 * MiB,
  streamBuffers: 4,
  countRecords: false,
};

const modes: { label: string; expect: CopyMethod; options: CopyOptions }[] = [
  { label: 'server single-shot (copy-from-url)', expect: 'copy-from-url', options: base },
  { label: 'server blocks (block-from-url)', expect: 'block-from-url', options: { ...base, singleShotMaxBytes: 1 } },
  { label: 'stream', expect: 'stream', options: { ...base, mode: 'stream' } },
  { label: 'stream + count records', expect: 'stream', options: { ...base, mode: 'stream', countRecords: true } },
];

async function main(): Promise<number> {
  const started = performance.now();
  process.stdout.write('generating test part… ');
  const part = buildPart();
  const sourceMd5 = createHash('md5').update(part.data).digest();
  const sourceMd5b64 = sourceMd5.toString('base64');
  console.log(`${(part.data.length / MiB).toFixed(1)} MiB gzip, ${part.records} records, md5 ${sourceMd5b64}`);

  let azurite: LocalAzurite | undefined;
  const failures: string[] = [];
  const rows: Row[] = [];
  try {
    azurite = await startAzurite();
    const { source, customer } = azurite;

    const sourceContainer = BlobServiceClient.fromConnectionString(source.connectionString).getContainerClient(
      'bench-export',
    );
    await sourceContainer.createIfNotExists();
    const blobName = 'OrgId=bench/_RbacGroupId=12/part-00000-bench.c000.json.gz';
    await sourceContainer.getBlockBlobClient(blobName).uploadData(part.data, {
      blobHTTPHeaders: { blobContentType: 'application/octet-stream', blobContentMD5: sourceMd5 },
    });
    const sas = generateBlobSASQueryParameters(
      {
        containerName: sourceContainer.containerName,
        blobName,
        permissions: BlobSASPermissions.parse('r'),
        startsOn: new Date(Date.now() - 5 * 60_000),
        expiresOn: new Date(Date.now() + 3_600_000),
      },
      new StorageSharedKeyCredential(source.name, source.key),
    ).toString();
    const sourceUrl = `${sourceContainer.getBlobClient(blobName).url}?${sas}`;

    const landing = BlobServiceClient.fromConnectionString(customer.connectionString).getContainerClient('bench');
    await landing.createIfNotExists();

    const check = async (label: string, name: string): Promise<void> => {
      const md5 = await md5OfBlob(landing, name);
      if (md5 !== sourceMd5b64) failures.push(`${label}: ${name} has md5 ${md5}, source ${sourceMd5b64}`);
      await landing.deleteBlob(name);
    };

    // Local limit: the same bytes uploaded from memory (one Put Blob below the SDK's 256 MiB single shot).
    const raw: Row = { label: 'raw upload (local limit)', samples: [] };
    for (let run = 0; run < RUNS; run++) {
      const name = `raw/${run}-${randomUUID()}.json.gz`;
      raw.samples.push(
        await measure(() =>
          landing
            .getBlockBlobClient(name)
            .uploadData(part.data)
            .then(() => {}),
        ),
      );
      await check(raw.label, name);
    }
    rows.push(raw);

    for (const mode of modes) {
      const copier = new PartCopier(landing, mode.options);
      const row: Row = { label: mode.label, samples: [] };
      for (let run = 0; run < RUNS; run++) {
        const name = `copy/${mode.expect}/${run}-${randomUUID()}.json.gz`;
        let result: Awaited<ReturnType<PartCopier['copy']>> | undefined;
        row.samples.push(
          await measure(async () => {
            result = await copier.copy({ sourceUrl, landingPath: name, metadata: { bench: 'copy-modes' } });
          }),
        );
        if (result?.method !== mode.expect) failures.push(`${mode.label}: used ${result?.method}, not ${mode.expect}`);
        if (result?.bytes !== part.data.length) failures.push(`${mode.label}: reported ${result?.bytes} bytes`);
        if (mode.options.countRecords && result?.records !== part.records) {
          failures.push(`${mode.label}: counted ${result?.records} records, expected ${part.records}`);
        }
        await check(mode.label, name);
      }
      rows.push(row);
    }
  } finally {
    await azurite?.stop();
  }

  const mibps = (s: Sample): number => part.data.length / MiB / (s.ms / 1000);
  const rawMedian = median(rows[0]?.samples.map(mibps) ?? []);
  const table = rows.map((row) => {
    const speed = median(row.samples.map(mibps));
    return [
      row.label,
      speed.toFixed(1),
      `${(speed / rawMedian).toFixed(2)}x`,
      (Math.max(...row.samples.map((s) => s.rssDeltaBytes)) / MiB).toFixed(1),
      (Math.max(...row.samples.map((s) => s.peakHeapBytes)) / MiB).toFixed(1),
    ];
  });
  const header = ['mode', 'median MiB/s', 'vs raw upload', 'peak RSS delta MiB', 'peak heap MiB'];
  const widths = header.map((h, i) => Math.max(h.length, ...table.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]): string =>
    cells.map((c, i) => (i === 0 ? c.padEnd(widths[i] ?? 0) : c.padStart(widths[i] ?? 0))).join(' | ');

  console.log('');
  console.log(
    `part: ${(part.data.length / MiB).toFixed(1)} MiB, ${RUNS} runs per mode, median shown; ` +
      `memory = worst run, sampled every ${SAMPLE_MS} ms${gc ? '' : ' (no gc available: deltas are noisy)'}`,
  );
  console.log(line(header));
  console.log(widths.map((w) => '-'.repeat(w)).join('-|-'));
  for (const row of table) console.log(line(row));
  console.log('');
  console.log(
    "Note: Azurite's Copy Blob From URL is an internal metadata copy (near-instant, no 256 MiB cap): " +
      'its speed is not representative of Azure.',
  );
  console.log(`total bench time ${((performance.now() - started) / 1000).toFixed(1)} s`);

  if (failures.length > 0) {
    console.error('\nVERIFICATION FAILED:');
    for (const f of failures) console.error(`  ${f}`);
    return 1;
  }
  console.log('all copies verified: md5 of every landed blob equals the source');
  return 0;
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (error: unknown) => {
    console.error(error);
    process.exitCode = 1;
  },
);
