/**
 * One byte-moving job of `npm run bench`, alone in a fresh Node process, so its peak RSS (VmHWM) is the job's and
 * nothing else's. The parent passes the job as JSON in argv[2] and reads one JSON line from stdout.
 * Copy modes go through PartCopier exactly as the app does; the baselines are the least code that does the same
 * transfer with the storage SDK.
 */
import { createWriteStream, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createGunzip } from 'node:zlib';
import { BlobClient, ContainerClient } from '@azure/storage-blob';
import type { ExportId } from '../../src/core/catalog.js';
import { runBounded } from '../../src/core/concurrency.js';
import type { CopyOptions } from '../../src/core/copier.js';
import { blockId } from '../../src/core/streamCopy.js';

// Everything else is imported by the job that needs it: a job's peak RSS counts the modules its own work loads (the
// copy modes: the copier and the storage SDK), not the JSON-mode, Parquet and Functions code other jobs load.
// `idle-app` measures what loading the whole app adds.

export type ByteJobKind =
  | 'copier'
  | 'bare-block-from-url'
  | 'download-to-nowhere'
  | 'upload-from-memory'
  | 'bare-download-gunzip-count'
  | 'naive-download-then-upload'
  | 'idle-sdk'
  | 'idle-app'
  | 'json-pages'
  | 'bare-json-pages'
  | 'curate-hyparquet'
  | 'curate-duckdb'
  | 'bare-download-gunzip-parse';

export interface ByteJob {
  readonly kind: ByteJobKind;
  readonly sourceUrl: string;
  readonly landingUrl: string;
  readonly landingPath: string;
  readonly sizeBytes: number;
  readonly blockSizeBytes: number;
  readonly blockConcurrency: number;
  readonly copyOptions?: CopyOptions;
  /** Paged jobs: the app's settings (as the Function App would have them) and the export to read. */
  readonly env?: Record<string, string>;
  readonly exportId?: ExportId;
}

export interface ByteJobResult {
  readonly ms: number;
  readonly cpuMs: number;
  readonly maxRssBytes: number;
  readonly bytes: number;
  readonly records?: number;
  readonly method?: string;
}

interface JobOutcome {
  readonly bytes: number;
  readonly records?: number;
  readonly method?: string;
  /** When only part of the job is the measured transfer (upload from memory: not the download that fills it). */
  readonly timedMs?: number;
}

async function run(job: ByteJob): Promise<JobOutcome> {
  if (job.kind === 'json-pages' || job.kind === 'bare-json-pages') return runPaged(job);
  if (job.kind === 'curate-hyparquet' || job.kind === 'curate-duckdb' || job.kind === 'bare-download-gunzip-parse') {
    return runCurate(job);
  }
  const landing = new ContainerClient(job.landingUrl);
  const source = new BlobClient(job.sourceUrl);
  switch (job.kind) {
    case 'idle-sdk':
      // The floor: a process with the storage SDK loaded that asks one small question.
      await source.getProperties();
      return { bytes: 0 };
    case 'idle-app':
      // A worker of the Function App loads the entry point (every function, telemetry) before it copies anything.
      Object.assign(process.env, job.env);
      {
        // Outside the Functions host, @azure/functions warns once per function it does not register; the bench
        // wants the memory of loading them, not the warnings.
        const warn = console.warn;
        console.warn = () => {};
        try {
          await import('../../src/functions/index.js');
        } finally {
          console.warn = warn;
        }
      }
      await source.getProperties();
      return { bytes: 0 };
    case 'copier': {
      if (!job.copyOptions) throw new Error('copier job without copyOptions');
      const { PartCopier } = await import('../../src/core/copier.js');
      const result = await new PartCopier(landing, job.copyOptions).copy({
        sourceUrl: job.sourceUrl,
        landingPath: job.landingPath,
        metadata: { bench: 'bytes' },
      });
      return {
        bytes: result.bytes,
        method: result.method,
        ...(result.records === undefined ? {} : { records: result.records }),
      };
    }
    case 'bare-block-from-url': {
      const dest = landing.getBlockBlobClient(job.landingPath);
      const count = Math.ceil(job.sizeBytes / job.blockSizeBytes);
      const ids = Array.from({ length: count }, (_, i) => blockId(i));
      await runBounded(ids, job.blockConcurrency, (id, i) => {
        const offset = i * job.blockSizeBytes;
        return dest.stageBlockFromURL(id, job.sourceUrl, offset, Math.min(job.blockSizeBytes, job.sizeBytes - offset));
      });
      await dest.commitBlockList(ids);
      return { bytes: job.sizeBytes };
    }
    case 'download-to-nowhere': {
      const response = await source.download();
      let bytes = 0;
      for await (const chunk of response.readableStreamBody as AsyncIterable<Buffer>) bytes += chunk.length;
      return { bytes };
    }
    case 'upload-from-memory': {
      // The bytes are already here (generated, not downloaded): what uploading them costs, in the stream path's
      // block shape. This process holds the whole part, so its RSS is not a baseline for memory.
      const data = await source.downloadToBuffer(Buffer.allocUnsafe(job.sizeBytes));
      const dest = landing.getBlockBlobClient(job.landingPath);
      const count = Math.ceil(job.sizeBytes / job.blockSizeBytes);
      const ids = Array.from({ length: count }, (_, i) => blockId(i));
      const started = performance.now();
      await runBounded(ids, job.blockConcurrency, (id, i) => {
        const offset = i * job.blockSizeBytes;
        const block = data.subarray(offset, Math.min(offset + job.blockSizeBytes, job.sizeBytes));
        return dest.stageBlock(id, block, block.length);
      });
      await dest.commitBlockList(ids);
      return { bytes: data.length, timedMs: performance.now() - started };
    }
    case 'bare-download-gunzip-count': {
      const response = await source.download();
      let records = 0;
      await pipeline(
        response.readableStreamBody as NodeJS.ReadableStream,
        createGunzip({ chunkSize: 256 * 1024 }),
        new Writable({
          write(chunk: Buffer, _encoding, callback) {
            for (let nl = chunk.indexOf(0x0a); nl !== -1; nl = chunk.indexOf(0x0a, nl + 1)) records++;
            callback();
          },
        }),
      );
      return { bytes: job.sizeBytes, records };
    }
    case 'naive-download-then-upload': {
      // What most scripts do: the whole part into memory, then one upload.
      const data = await source.downloadToBuffer();
      await landing.getBlockBlobClient(job.landingPath).uploadData(data, {
        blockSize: job.blockSizeBytes,
        concurrency: job.blockConcurrency,
      });
      return { bytes: data.length };
    }
  }
}

/**
 * JSON mode as the app runs it (one tick of the export's timer: every page into gzip JSON Lines parts, manifest
 * written), or its baseline: the same pages fetched with the same token and thrown away.
 */
async function runPaged(job: ByteJob): Promise<JobOutcome> {
  const [{ getExportType }, { loadConfig }, { requestJsonSnapshot }, { createCredential, createRuntime }, storage] =
    await Promise.all([
      import('../../src/core/catalog.js'),
      import('../../src/core/config.js'),
      import('../../src/core/pagedRead.js'),
      import('../../src/core/runtime.js'),
      import('../../src/core/storage.js'),
    ]);
  const { Telemetry } = await import('../../src/core/telemetry.js');
  const { request } = await import('undici');
  Object.assign(process.env, job.env);
  const config = loadConfig(process.env);
  const runtime = createRuntime(config);
  const exportId = job.exportId ?? 'software-vulnerabilities';
  if (job.kind === 'json-pages') {
    await storage.ensureStorage(runtime.storage);
    const telemetry = new Telemetry({ info() {}, warn() {}, error() {} });
    const result = await requestJsonSnapshot(runtime, telemetry, exportId);
    if (result.outcome !== 'completed') throw new Error(`JSON snapshot ${result.outcome}`);
    const row = await runtime.store.getSnapshot(exportId, result.generatedTime);
    return { bytes: row?.value.bytesLanded ?? 0, records: result.recordsLanded, method: 'json-pages' };
  }
  const type = getExportType(exportId);
  if (!('jsonPath' in type)) throw new Error(`${exportId} has no JSON endpoint`);
  const token = (await createCredential(config).getToken(config.defender.scope))?.token ?? '';
  let next: string | undefined = `${config.defender.baseUrl}${type.jsonPath}?pageSize=${config.pageSize}`;
  let bytes = 0;
  while (next) {
    const response = await request(next, { headers: { authorization: `Bearer ${token}` } });
    let tail = '';
    for await (const chunk of response.body as AsyncIterable<Buffer>) {
      bytes += chunk.length;
      tail = (tail + chunk.toString('latin1')).slice(-64 * 1024);
    }
    next = /"@odata\.nextLink":"([^"]+)"/.exec(tail)?.[1];
  }
  return { bytes };
}

/**
 * One raw part to Parquet. `curate-hyparquet` is the app's own path (curatePart: read back, normalise, row groups into
 * staged blocks). `curate-duckdb` is the candidate it was chosen over: the part downloaded to a temp file, DuckDB's
 * read_json (its own schema inference, no casing normalisation: less work than the app does) and COPY TO Parquet, the
 * file uploaded. The baseline is the least any JSON conversion in this process must do: download, gunzip, parse every
 * line.
 */
async function runCurate(job: ByteJob): Promise<JobOutcome> {
  const [{ loadConfig }, { createRuntime }, { curatePart, readRawManifest }, { Telemetry }] = await Promise.all([
    import('../../src/core/config.js'),
    import('../../src/core/runtime.js'),
    import('../../src/derive/curate.js'),
    import('../../src/core/telemetry.js'),
  ]);
  Object.assign(process.env, job.env);
  const runtime = createRuntime(loadConfig(process.env));
  const exportId = job.exportId ?? 'software-vulnerabilities';
  const snapshot = job.landingPath.split('/')[1]?.replace('snapshot=', '') ?? '';
  if (job.kind === 'curate-hyparquet') {
    const manifest = await readRawManifest(runtime, exportId, snapshot);
    const telemetry = new Telemetry({ info() {}, warn() {}, error() {} });
    const result = await curatePart(runtime, telemetry, manifest, job.landingPath);
    return { bytes: result.bytes, records: result.rows, method: 'hyparquet-writer' };
  }
  const body = (await runtime.landing.getBlobClient(job.landingPath).download()).readableStreamBody;
  if (!body) throw new Error('no body');
  if (job.kind === 'bare-download-gunzip-parse') {
    const gunzip = createGunzip();
    const reading = pipeline(body, gunzip);
    let records = 0;
    for await (const line of createInterface({ input: gunzip, crlfDelay: Number.POSITIVE_INFINITY })) {
      if (line !== '') {
        JSON.parse(line);
        records++;
      }
    }
    await reading;
    return { bytes: 0, records };
  }
  const folder = mkdtempSync(join(tmpdir(), 'bench-duckdb-'));
  try {
    const input = join(folder, 'part.json.gz');
    const output = join(folder, 'part.parquet');
    await pipeline(body, createWriteStream(input));
    const { DuckDBInstance } = await import('@duckdb/node-api');
    const db = await DuckDBInstance.create(':memory:');
    const sql = await db.connect();
    await sql.run(
      `copy (select * from read_json('${input}', format = 'newline_delimited')) to '${output}' (format parquet)`,
    );
    const counted = await sql.runAndReadAll(`select count(*)::INTEGER as n from read_parquet('${output}')`);
    const records = Number(counted.getRowObjectsJS()[0]?.n ?? 0);
    sql.closeSync();
    db.closeSync();
    await runtime.landing
      .getBlockBlobClient(`bench-duckdb/${job.landingPath.replace(/\.json\.gz$/, '.parquet')}`)
      .uploadFile(output);
    return { bytes: statSync(output).size, records, method: 'duckdb' };
  } finally {
    rmSync(folder, { recursive: true, force: true });
  }
}

/**
 * This process's own peak RSS. On Linux, getrusage's maxrss survives exec: a child spawned by a parent holding 300 MiB
 * reports about 300 MiB before it does anything (the bench's parent holds Azurite clients, the simulator and generated
 * data, so every job looked 60 MiB heavier after the first sections). VmHWM is the peak of this process's own memory
 * map, which exec starts fresh.
 */
function peakRssBytes(): number {
  try {
    const kib = /^VmHWM:\s+(\d+) kB$/m.exec(readFileSync('/proc/self/status', 'utf8'))?.[1];
    if (kib) return Number(kib) * 1024;
  } catch {
    // Not Linux: getrusage is the best there is (KiB on Linux, bytes on macOS are not a concern here).
  }
  return process.resourceUsage().maxRSS * 1024;
}

const job = JSON.parse(process.argv[2] ?? '{}') as ByteJob;
const cpu = process.cpuUsage();
const started = performance.now();
run(job).then(
  (result) => {
    const { timedMs, ...rest } = result;
    const used = process.cpuUsage(cpu);
    const out: ByteJobResult = {
      ...rest,
      ms: timedMs ?? performance.now() - started,
      cpuMs: (used.user + used.system) / 1000,
      maxRssBytes: peakRssBytes(),
    };
    process.stdout.write(`${JSON.stringify(out)}\n`);
  },
  (error: unknown) => {
    process.stderr.write(`${(error as Error).stack ?? String(error)}\n`);
    process.exitCode = 1;
  },
);
