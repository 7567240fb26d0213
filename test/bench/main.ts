/**
 * `npm run bench`: every performance figure of the app beside its baseline, measured in one run against one
 * Azurite on this machine. Reports; asserts nothing (a failed byte check still exits 1). Writes bench/results.json
 * and ends with one line of key figures.
 *
 * Sections (`--only pipeline,tick,bytes` to pick):
 * - pipeline: parts/s, requests per part (by kind) and client CPU per part through the in-process host at 8, 32 and
 *   64 workers, beside a bare Copy Blob From URL loop over the same SAS URLs at concurrency 32 and, at each worker
 *   count, the floor: a loop that sends only the requests the app's guarantees need; median of --runs. Then what one
 *   request of each of the floor's kinds costs alone, summed per part: the floor's arithmetic, and the ceiling of a
 *   copier that sends no table request at all.
 * - tick: one tick that records and enqueues --tick-parts parts, beside its floor (the same Defender call, the same
 *   part rows inserted 100 to a transaction, the same messages sent at the same concurrency); median of --tick-runs,
 *   alternating which goes first.
 * - bytes: one part of --size-mib MiB (valid gzip JSON lines) through each copy mode, each in a fresh child process
 *   (peak RSS = that process's VmHWM), beside bare Put Block From URL, download-to-nowhere, upload from memory,
 *   bare download+gunzip+count and the naive download-then-upload; every landed copy is checked by MD5. Every child
 *   starts with the deployed worker's Node arguments (src/deploy/nodeArguments.ts; `--node-args` to change them),
 *   and the count copy runs once more with V8's defaults beside them (ADR 0012).
 *   `--byte-jobs stream,count` runs only the jobs whose label contains one of the words.
 * - paged: a JSON-mode snapshot of --paged-records software vulnerabilities in pages of 200,000 records, in a fresh
 *   process, beside the same pages downloaded to nowhere; peak RSS of each.
 * - curate: one landed part of --curate-records software vulnerabilities converted to Parquet by the app (curatePart,
 *   hyparquet-writer) and by DuckDB, each in a fresh process, beside download+gunzip+parse; MiB/s, CPU, peak RSS and
 *   the size each library adds to the deployment package (ADR 0011).
 */
import { execFile, execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { availableParallelism, cpus, totalmem } from 'node:os';
import { dirname, join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { pipeline as pipelineAsync } from 'node:stream/promises';
import { fileURLToPath } from 'node:url';
import { parseArgs, promisify } from 'node:util';
import { createGunzip, gzipSync } from 'node:zlib';
import { odata, TableClient } from '@azure/data-tables';
import {
  BlobClient,
  BlobSASPermissions,
  BlobServiceClient,
  ContainerSASPermissions,
  generateBlobSASQueryParameters,
  StorageSharedKeyCredential,
} from '@azure/storage-blob';
import { QueueClient } from '@azure/storage-queue';
import { getExportType } from '../../src/core/catalog.js';
import { runBounded } from '../../src/core/concurrency.js';
import type { CopyOptions } from '../../src/core/copier.js';
import type { PartMessage } from '../../src/core/messages.js';
import { encodeKey, partsPartitionKey } from '../../src/core/parts.js';
import { redact } from '../../src/core/redact.js';
import type { Runtime } from '../../src/core/runtime.js';
import { blockId } from '../../src/core/streamCopy.js';
import { NODE_ARGUMENTS } from '../../src/deploy/nodeArguments.js';
import type { LocalAzurite } from '../../src/local/azurite.js';
import { generateRecords } from '../../src/simulator/records.js';
import { appSettings, createApp, type Stack, startStack, type TestApp, tableRows } from '../helpers/stack.js';
import type { ByteJob, ByteJobKind, ByteJobResult } from './byteJob.js';
import { RequestCounter, total } from './requestCounter.js';

const MiB = 1024 * 1024;
const { values: flags } = parseArgs({
  options: {
    parts: { type: 'string', default: '400' },
    runs: { type: 'string', default: '3' },
    'tick-parts': { type: 'string', default: '10000' },
    'tick-runs': { type: 'string', default: '3' },
    'size-mib': { type: 'string', default: '1024' },
    'byte-runs': { type: 'string', default: '1' },
    // Comma-separated words: only the byte jobs whose label contains one of them (with their baselines' labels).
    'byte-jobs': { type: 'string', default: '' },
    'paged-records': { type: 'string', default: '400000' },
    'curate-records': { type: 'string', default: '200000' },
    only: { type: 'string', default: 'pipeline,tick,bytes,paged,curate' },
    // The Node.js arguments of every job's child process: by default the deployed worker's (src/deploy/nodeArguments.ts).
    'node-args': { type: 'string', default: NODE_ARGUMENTS.join(' ') },
  },
});
const nodeArguments = flags['node-args'].split(' ').filter(Boolean);
const sections = new Set(flags.only.split(','));
const counter = new RequestCounter().install();

interface Figure {
  readonly section: string;
  readonly label: string;
  readonly [key: string]: unknown;
}
const figures: Figure[] = [];
const failures: string[] = [];

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? (sorted[mid] ?? 0) : ((sorted[mid - 1] ?? 0) + (sorted[mid] ?? 0)) / 2;
}

function printTable(title: string, header: string[], rows: string[][]): void {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) =>
    cells.map((c, i) => (i === 0 ? c.padEnd(widths[i] ?? 0) : c.padStart(widths[i] ?? 0))).join(' | ');
  console.log(`\n${title}`);
  console.log(line(header));
  console.log(widths.map((w) => '-'.repeat(w)).join('-|-'));
  for (const row of rows) console.log(line(row));
}

/** CPU seconds Azurite's process has used so far (Linux; undefined elsewhere). */
function azuriteCpuSeconds(azurite: LocalAzurite): number | undefined {
  try {
    const fields = readFileSync(`/proc/${azurite.pid}/stat`, 'utf8').split(') ')[1]?.split(' ') ?? [];
    // utime and stime, fields 14 and 15 of /proc/<pid>/stat (11 and 12 after the command name).
    return (Number(fields[11]) + Number(fields[12])) / 100;
  } catch {
    return undefined;
  }
}

/**
 * Waits (at most 120 s) until Azurite has used under 5% of a core for 2 s. Azurite sweeps its queue and blob
 * stores on timers and frees the previous section's data at its own pace: measured right after the pipeline section,
 * one 10,000-part tick took 33 to 272 s instead of 9 to 13, with every request the same; Azurite had been busy alone.
 */
async function whenAzuriteIdle(azurite: LocalAzurite, section: string): Promise<void> {
  const started = performance.now();
  for (let busy = azuriteCpuSeconds(azurite); busy !== undefined && performance.now() - started < 120_000; ) {
    await new Promise((resolve) => setTimeout(resolve, 2_000));
    const now = azuriteCpuSeconds(azurite);
    if (now === undefined || now - busy < 0.1) break;
    busy = now;
  }
  const waited = (performance.now() - started) / 1000;
  if (waited > 2.5) console.log(`(${section}: waited ${waited.toFixed(0)} s for Azurite to go idle)`);
}

/** Wall time, client CPU and requests by kind of `work`. */
async function measured<T>(work: () => Promise<T>) {
  const requests = counter.mark();
  const cpu = process.cpuUsage();
  const started = performance.now();
  const value = await work();
  const seconds = (performance.now() - started) / 1000;
  const used = process.cpuUsage(cpu);
  const byKind = requests();
  return { value, seconds, cpuMs: (used.user + used.system) / 1000, byKind, requests: total(byKind) };
}

// ---------------------------------------------------------------------------------------------------------------
// pipeline

const PIPELINE_EXPORT = 'software-inventory-noncpe' as const;

async function pipelineSection(stack: Stack, parts: number, runs: number): Promise<void> {
  const groups = 10;
  await stack.simulator.publish(PIPELINE_EXPORT, {
    generatedTime: '2026-11-21T12:01:00Z',
    groups: Array.from({ length: groups }, (_, i) => i),
    partsPerGroup: Math.max(1, Math.round(parts / groups) - 1),
    recordsPerPart: 2,
  });
  type Sample = { partsPerSecond: number; requestsPerPart: number; cpuMsPerPart: number; complete: boolean | null };
  const samples = new Map<string, Sample[]>();
  const byKind = new Map<string, Record<string, number>>();
  const add = (label: string, sample: Sample, kinds: Record<string, number>) => {
    samples.set(label, [...(samples.get(label) ?? []), sample]);
    byKind.set(label, kinds);
  };
  // Every run lists the same snapshot again: the Defender API's per-minute quota (which the simulator enforces) is not
  // what this section measures, and a tick that enqueued less would make the run's figures meaningless.
  const enqueueAll = async (app: TestApp) => {
    stack.simulator.resetRateLimits();
    await app.runner.tick();
    const queued = (await app.runtime.queue.getProperties()).approximateMessagesCount ?? 0;
    if (queued !== count) throw new Error(`the tick enqueued ${queued} of ${count} parts`);
  };
  const BARE = 'bare Copy Blob From URL loop, concurrency 32';
  const FLOOR = 'floor: the necessary requests only';
  let count = 0;
  for (let run = 0; run < runs; run++) {
    const bare = await createApp(stack, { MDVM_EXPORTS: PIPELINE_EXPORT });
    stack.simulator.resetRateLimits();
    const { exportFiles } = await bare.runtime.defender.getExportFiles(getExportType(PIPELINE_EXPORT), {
      sasValidHours: 1,
    });
    count = exportFiles.length;
    const landing = bare.runtime.landing;
    const b = await measured(() =>
      runBounded(exportFiles, 32, (url, i) => landing.getBlockBlobClient(`bare/${i}.json.gz`).syncCopyFromURL(url)),
    );
    add(
      BARE,
      {
        partsPerSecond: count / b.seconds,
        requestsPerPart: b.requests / count,
        cpuMsPerPart: b.cpuMs / count,
        complete: null,
      },
      b.byKind,
    );
    for (const workers of [8, 32, 64]) {
      const floorApp = await createApp(stack, { MDVM_EXPORTS: PIPELINE_EXPORT });
      await enqueueAll(floorApp);
      const f = await measured(() => necessaryRequestsLoop(floorApp.runtime, workers));
      add(
        `${FLOOR}, ${workers} workers`,
        {
          partsPerSecond: count / f.seconds,
          requestsPerPart: f.requests / count,
          cpuMsPerPart: f.cpuMs / count,
          complete: f.value,
        },
        f.byKind,
      );
      const app = await createApp(stack, { MDVM_EXPORTS: PIPELINE_EXPORT }, { workers });
      await enqueueAll(app);
      const r = await measured(async () => {
        await app.runner.drain();
        const [row] = await tableRows(app.runtime.storage.snapshotsTable);
        return row?.status === 'complete';
      });
      add(
        `run, ${workers} workers`,
        {
          partsPerSecond: count / r.seconds,
          requestsPerPart: r.requests / count,
          cpuMsPerPart: r.cpuMs / count,
          complete: r.value,
        },
        r.byKind,
      );
    }
  }
  const bareRate = median((samples.get(BARE) ?? []).map((s) => s.partsPerSecond));
  const bareCpu = median((samples.get(BARE) ?? []).map((s) => s.cpuMsPerPart));
  const floorOf = (label: string) => {
    const workers = /^run, (\d+) workers$/.exec(label)?.[1];
    const list = workers ? samples.get(`${FLOOR}, ${workers} workers`) : undefined;
    return list
      ? { rate: median(list.map((s) => s.partsPerSecond)), cpu: median(list.map((s) => s.cpuMsPerPart)) }
      : undefined;
  };
  const rows: string[][] = [];
  for (const [label, list] of samples) {
    const rate = median(list.map((s) => s.partsPerSecond));
    const cpu = median(list.map((s) => s.cpuMsPerPart));
    const floor = floorOf(label);
    const figure = {
      section: 'pipeline',
      label,
      parts: count,
      runs,
      partsPerSecond: rate,
      vsBare: rate / bareRate,
      requestsPerPart: median(list.map((s) => s.requestsPerPart)),
      cpuMsPerPart: cpu,
      cpuVsBare: cpu / bareCpu,
      vsFloor: floor ? rate / floor.rate : null,
      cpuVsFloor: floor ? cpu / floor.cpu : null,
      completeRuns: list[0]?.complete === null ? null : list.filter((s) => s.complete).length,
      requestsByKindLastRun: byKind.get(label),
    };
    figures.push(figure);
    rows.push([
      label,
      rate.toFixed(1),
      `${figure.vsBare.toFixed(2)}x`,
      figure.requestsPerPart.toFixed(2),
      cpu.toFixed(2),
      `${figure.cpuVsBare.toFixed(1)}x`,
      figure.vsFloor === null ? '' : `${figure.vsFloor.toFixed(2)}x`,
      figure.cpuVsFloor === null ? '' : `${figure.cpuVsFloor.toFixed(2)}x`,
      figure.completeRuns === null ? '' : `${figure.completeRuns}/${runs}`,
    ]);
  }
  printTable(
    `pipeline: ${count} parts of one export, median of ${runs} runs`,
    ['', 'parts/s', 'vs bare', 'requests/part', 'CPU ms/part', 'CPU vs bare', 'vs floor', 'CPU vs floor', 'complete'],
    rows,
  );
  for (const [label, kinds] of byKind) console.log(`  ${label}: ${JSON.stringify(kinds)}`);
  await requestCostsOf(stack);
}

/**
 * What one request of each kind the floor sends costs on this machine, each kind alone at concurrency 32 over the
 * same parts: the arithmetic behind the floor, and the ceiling of any copier that still reads the source's
 * properties and deletes its message, whatever it does about the table.
 */
async function requestCostsOf(stack: Stack): Promise<void> {
  const app = await createApp(stack, { MDVM_EXPORTS: PIPELINE_EXPORT });
  stack.simulator.resetRateLimits();
  const { exportFiles } = await app.runtime.defender.getExportFiles(getExportType(PIPELINE_EXPORT), {
    sasValidHours: 1,
  });
  const n = exportFiles.length;
  const { queue, partsTable, landing } = app.runtime.storage;
  const partitionKey = `cost_${randomBytes(4).toString('hex')}`;
  const rowKeys = exportFiles.map((_, i) => String(i).padStart(6, '0'));
  await runBounded(rowKeys, 32, (rowKey) =>
    partsTable.createEntity({ partitionKey, rowKey, status: 'queued', landingPath: `cost/${rowKey}` }),
  );
  await runBounded(exportFiles, 32, (url) =>
    queue.sendMessage(Buffer.from(url.split('?')[0] ?? '').toString('base64')),
  );
  const etags: string[] = [];
  const received: { messageId: string; popReceipt: string }[] = [];
  type Cost = { label: string; perPart: number; msPerRequest: number; cpuMsPerRequest: number };
  const costs: Cost[] = [];
  const cost = async (label: string, perPart: number, requests: number, work: () => Promise<unknown>) => {
    const m = await measured(work);
    costs.push({ label, perPart, msPerRequest: (m.seconds * 1000) / requests, cpuMsPerRequest: m.cpuMs / requests });
  };
  await cost('Copy Blob From URL, create-only', 1, n, () =>
    runBounded(exportFiles, 32, (url, i) =>
      landing.getBlockBlobClient(`cost/${i}.json.gz`).syncCopyFromURL(url, { conditions: { ifNoneMatch: '*' } }),
    ),
  );
  await cost('source HEAD', 1, n, () => runBounded(exportFiles, 32, (url) => new BlobClient(url).getProperties()));
  await cost('part row read', 1, n, () =>
    runBounded(rowKeys, 32, async (rowKey, i) => {
      etags[i] = (await partsTable.getEntity(partitionKey, rowKey)).etag;
    }),
  );
  await cost('"anything left?" query, one row', 1, n, () =>
    runBounded(rowKeys, 32, async () => {
      const pages = partsTable
        .listEntities({ queryOptions: { filter: odata`PartitionKey eq ${partitionKey} and status eq ${'queued'}` } })
        .byPage({ maxPageSize: 1 });
      await pages.next();
    }),
  );
  await cost('part row flip under its ETag', 1, n, () =>
    runBounded(rowKeys, 32, (rowKey, i) =>
      partsTable.updateEntity({ partitionKey, rowKey, status: 'landed' }, 'Merge', { etag: etags[i] ?? '*' }),
    ),
  );
  const receives = Math.ceil(n / 32);
  await cost('queue receive, 32 a call', 1 / 32, receives, async () => {
    while (received.length < n) {
      const batch = await queue.receiveMessages({ numberOfMessages: 32, visibilityTimeout: 300 });
      if (batch.receivedMessageItems.length === 0) throw new Error(`the cost queue held ${received.length} of ${n}`);
      received.push(...batch.receivedMessageItems);
    }
  });
  await cost('queue delete', 1, n, () =>
    runBounded(received, 32, (m) => queue.deleteMessage(m.messageId, m.popReceipt)),
  );

  const perPart = (list: Cost[], of: (c: Cost) => number) => list.reduce((sum, c) => sum + c.perPart * of(c), 0);
  // The copy alone is the bare loop, measured here in the same state as the rest: the ratios compare like with like.
  const copy = costs[0];
  const copyMs = copy?.msPerRequest ?? Number.NaN;
  const copyCpuMs = copy?.cpuMsPerRequest ?? Number.NaN;
  const noTable = costs.filter((c) => !/row|query/.test(c.label));
  const sums = [
    { label: 'sum: the floor, one part', list: costs },
    { label: 'sum: copy, HEAD, receive and delete only (no table request at all)', list: noTable },
  ].map(({ label, list }) => ({
    label,
    ms: perPart(list, (c) => c.msPerRequest),
    cpuMs: perPart(list, (c) => c.cpuMsPerRequest),
  }));
  for (const c of costs) figures.push({ section: 'request-costs', ...c });
  for (const sum of sums) {
    figures.push({
      section: 'request-costs',
      label: sum.label,
      msPerPart: sum.ms,
      partsPerSecond: 1000 / sum.ms,
      vsCopyAlone: copyMs / sum.ms,
      cpuMsPerPart: sum.cpuMs,
      cpuVsCopyAlone: sum.cpuMs / copyCpuMs,
    });
  }
  printTable(
    `request costs: each kind alone, ${n} requests at concurrency 32 (ms = wall time / requests)`,
    ['', 'per part', 'ms/request', 'CPU ms/request'],
    costs.map((c) => [
      c.label,
      c.perPart === 1 ? '1' : '1/32',
      c.msPerRequest.toFixed(3),
      c.cpuMsPerRequest.toFixed(3),
    ]),
  );
  for (const sum of sums) {
    console.log(
      `  ${sum.label}: ${sum.ms.toFixed(2)} ms a part, ${(1000 / sum.ms).toFixed(0)} parts/s, ${(copyMs / sum.ms).toFixed(2)}x the copy alone; client CPU ${sum.cpuMs.toFixed(2)} ms, ${(sum.cpuMs / copyCpuMs).toFixed(1)}x the copy's`,
    );
  }
}

/**
 * The least any copier with the app's guarantees sends per part, with the same SDK clients and nothing around them:
 * batched receives (32 a call), then per part the source's HEAD (size, MD5, ETag: what the manifest states and the
 * copy is pinned to), the part row (a message may only copy the source the tick recorded), Copy Blob From URL
 * (create-only, pinned), the row flipped to landed under its ETag (the exactly-once point), the message deleted and
 * one "anything left?" query. No validation, telemetry, retries or manifest: the gap between `run` and this loop is
 * the app's own cost; the gap between this loop and the bare copy is the price of the guarantees.
 */
async function necessaryRequestsLoop(runtime: Runtime, workers: number): Promise<boolean> {
  const { queue, partsTable, landing } = runtime.storage;
  type Item = Awaited<ReturnType<typeof queue.receiveMessages>>['receivedMessageItems'][number];
  const waiting: Item[] = [];
  let drained = false;
  const next = async (): Promise<Item | undefined> => {
    while (waiting.length === 0 && !drained) {
      const { receivedMessageItems } = await queue.receiveMessages({ numberOfMessages: 32 });
      if (receivedMessageItems.length === 0) drained = true;
      waiting.push(...receivedMessageItems);
    }
    return waiting.shift();
  };
  const nothingLeft = async (partitionKey: string) => {
    const left = partsTable
      .listEntities({ queryOptions: { filter: odata`PartitionKey eq ${partitionKey} and status eq ${'queued'}` } })
      .byPage({ maxPageSize: 1 });
    const first = await left.next();
    return first.done === true || first.value.length === 0;
  };
  let partitionKey = '';
  const worker = async () => {
    for (let item = await next(); item; item = await next()) {
      const message = JSON.parse(Buffer.from(item.messageText, 'base64').toString('utf8')) as PartMessage;
      partitionKey = partsPartitionKey(message.export, message.snapshot);
      const rowKey = encodeKey(message.part);
      const source = await new BlobClient(message.sourceUrl).getProperties();
      const row = await partsTable.getEntity<{ landingPath: string }>(partitionKey, rowKey);
      const copied = await landing.getBlockBlobClient(row.landingPath).syncCopyFromURL(message.sourceUrl, {
        conditions: { ifNoneMatch: '*' },
        sourceConditions: { ifMatch: source.etag ?? '*' },
      });
      await partsTable.updateEntity(
        { partitionKey, rowKey, status: 'landed', bytes: source.contentLength ?? 0, md5: String(copied.contentMD5) },
        'Merge',
        { etag: row.etag },
      );
      await queue.deleteMessage(item.messageId, item.popReceipt);
      await nothingLeft(partitionKey);
    }
  };
  await Promise.all(Array.from({ length: workers }, worker));
  // Once more after every worker is done: whether the loop really landed every part (one request in all).
  return nothingLeft(partitionKey);
}

// ---------------------------------------------------------------------------------------------------------------
// tick

const TICK_EXPORT = 'software-vulnerabilities' as const;

async function tickSection(stack: Stack, parts: number, runs: number): Promise<void> {
  const groups = Math.max(1, Math.round(parts / 100));
  const perGroup = Math.max(1, Math.round(parts / groups));
  await stack.simulator.publish(TICK_EXPORT, {
    generatedTime: '2026-11-21T13:01:00Z',
    groups: Array.from({ length: groups }, (_, i) => i),
    // Task 1 is split in two files: perGroup - 1 tasks give perGroup files.
    partsPerGroup: perGroup - 1,
    recordsPerPart: 1,
  });

  // Each run gets fresh tables and queues, so every tick records and enqueues the whole snapshot.
  const tickOnce = async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: TICK_EXPORT });
    // The quota is per export type and no other section lists this one; reset anyway, so the two start alike.
    stack.simulator.resetRateLimits();
    await whenAzuriteIdle(stack.azurite, 'tick');
    const tick = await measured(() => app.runner.tick());
    const offered = (await app.runtime.queue.getProperties()).approximateMessagesCount ?? 0;
    return { ...tick, offered };
  };
  // The floor: the same work with nothing around it, against a scratch table and queue.
  const floorOnce = async () => {
    const floorApp = await createApp(stack, { MDVM_EXPORTS: TICK_EXPORT });
    const suffix = randomBytes(4).toString('hex');
    const table = TableClient.fromConnectionString(stack.azurite.customer.connectionString, `benchfloor${suffix}`, {
      allowInsecureConnection: true,
    });
    await table.createTable();
    const queue = new QueueClient(stack.azurite.customer.connectionString, `benchfloor-${suffix}`);
    await queue.createIfNotExists();
    const concurrency = floorApp.runtime.config.enqueueConcurrency;
    stack.simulator.resetRateLimits();
    await whenAzuriteIdle(stack.azurite, 'tick floor');
    return measured(async () => {
      const { exportFiles } = await floorApp.runtime.defender.getExportFiles(getExportType(TICK_EXPORT), {
        sasValidHours: 6,
      });
      const rows = exportFiles.map((url, i) => {
        const path = new URL(url).pathname;
        return {
          partitionKey: 'floor',
          rowKey: String(i).padStart(6, '0'),
          path,
          sourcePath: path,
          landingPath: path,
          status: 'queued',
          attempts: 0,
          queuedAt: new Date().toISOString(),
        };
      });
      for (let i = 0; i < rows.length; i += 100) {
        await table.submitTransaction(rows.slice(i, i + 100).map((entity) => ['create', entity]));
      }
      await runBounded(exportFiles, concurrency, (url, i) =>
        queue.sendMessage(
          Buffer.from(
            JSON.stringify({ v: 1, part: rows[i]?.path, sourceUrl: url, at: new Date().toISOString() }),
          ).toString('base64'),
        ),
      );
      return exportFiles.length;
    });
  };
  const ticks: Awaited<ReturnType<typeof tickOnce>>[] = [];
  const floors: Awaited<ReturnType<typeof floorOnce>>[] = [];
  for (let run = 0; run < runs; run++) {
    // Alternating which goes first, so neither always meets Azurite after the other's work.
    if (run % 2 === 0) {
      ticks.push(await tickOnce());
      floors.push(await floorOnce());
    } else {
      floors.push(await floorOnce());
      ticks.push(await tickOnce());
    }
    console.log(
      `  run ${run + 1}: tick ${ticks.at(-1)?.seconds.toFixed(1)} s, floor ${floors.at(-1)?.seconds.toFixed(1)} s`,
    );
  }
  const tick = ticks[0];
  const floor = floors[0];
  if (!tick || !floor) return;
  const tickSeconds = median(ticks.map((t) => t.seconds));
  const floorSeconds = median(floors.map((f) => f.seconds));
  // The Defender call goes through undici, which the counter does not see: one on each side.
  const tickRequests = median(ticks.map((t) => t.requests)) + 1;
  const floorRequests = median(floors.map((f) => f.requests)) + 1;
  const figure = {
    section: 'tick',
    label: `one tick, ${floor.value} parts`,
    parts: floor.value,
    runs,
    enqueued: tick.offered,
    seconds: tickSeconds,
    secondsByRun: ticks.map((t) => t.seconds),
    requests: tickRequests,
    floorSeconds,
    floorSecondsByRun: floors.map((f) => f.seconds),
    floorRequests,
    timeVsFloor: tickSeconds / floorSeconds,
    requestsVsFloor: tickRequests / floorRequests,
    requestsByKind: tick.byKind,
    floorRequestsByKind: floor.byKind,
  };
  figures.push(figure);
  for (const t of ticks) {
    if (t.offered !== floor.value) failures.push(`tick enqueued ${t.offered} messages for ${floor.value} parts`);
  }
  printTable(
    `tick: one tick that records and enqueues ${floor.value} parts, beside its floor; median of ${runs} run(s)`,
    ['', 'seconds', 'requests', 'vs floor (time)', 'vs floor (requests)'],
    [
      [
        'tick',
        tickSeconds.toFixed(1),
        String(tickRequests),
        `${figure.timeVsFloor.toFixed(2)}x`,
        `${figure.requestsVsFloor.toFixed(3)}x`,
      ],
      ['floor: 1 API call + inserts by 100 + sends', floorSeconds.toFixed(1), String(floorRequests), '', ''],
    ],
  );
  console.log(`  tick: ${JSON.stringify(tick.byKind)}`);
  console.log(`  floor: ${JSON.stringify(floor.byKind)}`);
}

// ---------------------------------------------------------------------------------------------------------------
// bytes

/** ~80 bytes of gzip per software-vulnerabilities record: one member is about 4 MiB compressed. */
const RECORDS_PER_MEMBER = 52_000;

async function sourcePart(azurite: LocalAzurite, sizeBytes: number) {
  const member = gzipSync(generateRecords('software-vulnerabilities', 'bench/member', 12, RECORDS_PER_MEMBER));
  const members = Math.max(1, Math.round(sizeBytes / member.length));
  const container = BlobServiceClient.fromConnectionString(azurite.source.connectionString).getContainerClient(
    'bench-export',
  );
  await container.createIfNotExists();
  const blobName = 'OrgId=bench/_RbacGroupId=12/part-00000-bench.c000.json.gz';
  const blob = container.getBlockBlobClient(blobName);
  // A gzip file may hold many members and gunzip reads them as one stream: the same member, staged N times.
  const ids = Array.from({ length: members }, (_, i) => blockId(i));
  await runBounded(ids, 8, (id) => blob.stageBlock(id, member, member.length));
  const md5 = createHash('md5');
  for (let i = 0; i < members; i++) md5.update(member);
  const digest = md5.digest();
  await blob.commitBlockList(ids, {
    blobHTTPHeaders: { blobContentType: 'application/octet-stream', blobContentMD5: digest },
  });
  const sas = generateBlobSASQueryParameters(
    {
      containerName: container.containerName,
      blobName,
      permissions: BlobSASPermissions.parse('r'),
      startsOn: new Date(Date.now() - 5 * 60_000),
      expiresOn: new Date(Date.now() + 6 * 3_600_000),
    },
    new StorageSharedKeyCredential(azurite.source.name, azurite.source.key),
  ).toString();
  return {
    url: `${blob.url}?${sas}`,
    bytes: member.length * members,
    records: RECORDS_PER_MEMBER * members,
    md5: digest.toString('base64'),
  };
}

async function landingContainer(azurite: LocalAzurite) {
  const service = BlobServiceClient.fromConnectionString(azurite.customer.connectionString);
  const container = service.getContainerClient('bench-landing');
  await container.createIfNotExists();
  const sas = generateBlobSASQueryParameters(
    {
      containerName: container.containerName,
      permissions: ContainerSASPermissions.parse('racwd'),
      startsOn: new Date(Date.now() - 5 * 60_000),
      expiresOn: new Date(Date.now() + 6 * 3_600_000),
    },
    new StorageSharedKeyCredential(azurite.customer.name, azurite.customer.key),
  ).toString();
  return { container, url: `${container.url}?${sas}` };
}

const HERE = dirname(fileURLToPath(import.meta.url));
const STREAM_COUNT_NODE_DEFAULTS = "stream + count records, V8's default heap limits";

/** The same, without blocking this process: the paged jobs talk to the simulator, which runs here. */
async function runJobAsync(job: ByteJob): Promise<ByteJobResult> {
  const args = [...nodeArguments, join(HERE, 'byteJob.js'), JSON.stringify(job)];
  try {
    const { stdout } = await promisify(execFile)(process.execPath, args, {
      encoding: 'utf8',
      maxBuffer: 1024 * 1024,
    });
    return JSON.parse(stdout.trim().split('\n').at(-1) ?? '{}') as ByteJobResult;
  } catch (error) {
    throw jobFailed(job, error);
  }
}

function runJob(job: ByteJob, withArguments: readonly string[] = nodeArguments): ByteJobResult {
  try {
    const out = execFileSync(process.execPath, [...withArguments, join(HERE, 'byteJob.js'), JSON.stringify(job)], {
      encoding: 'utf8',
      maxBuffer: 1024 * 1024,
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    return JSON.parse(out.trim().split('\n').at(-1) ?? '{}') as ByteJobResult;
  } catch (error) {
    throw jobFailed(job, error);
  }
}

/** The child's failure without its command line, which holds the job's SAS URLs. */
function jobFailed(job: ByteJob, error: unknown): Error {
  const { status, stderr } = error as { status?: number; stderr?: unknown };
  const detail = typeof stderr === 'string' && stderr.trim() ? `: ${redact(stderr.trim())}` : ' (its error is above)';
  return new Error(`the ${job.kind} job failed with exit code ${status ?? '?'}${detail}`);
}

async function bytesSection(azurite: LocalAzurite, sizeMiB: number, runs: number): Promise<void> {
  // The app's defaults (MDVM_COPY_BLOCK_SIZE_MIB 8, MDVM_COPY_BLOCK_CONCURRENCY 8, MDVM_STREAM_BUFFER_MIB 4,
  // MDVM_STREAM_BUFFERS 4); the baselines move their bytes in the same blocks at the same concurrency.
  const copy: CopyOptions = {
    mode: 'server',
    singleShotMaxBytes: 256 * MiB,
    blockSizeBytes: 8 * MiB,
    blockConcurrency: 8,
    streamBufferBytes: 4 * MiB,
    streamBuffers: 4,
    countRecords: false,
  };
  const jobs: {
    label: string;
    kind: ByteJobKind;
    options?: CopyOptions;
    checkMd5: boolean;
    /** Instead of --node-args. */
    nodeArguments?: readonly string[];
  }[] = [
    { label: 'process with the storage SDK, one HEAD', kind: 'idle-sdk', checkMd5: false },
    { label: 'process with the whole app loaded, one HEAD', kind: 'idle-app', checkMd5: false },
    {
      label: 'block path (Put Block From URL)',
      kind: 'copier',
      options: { ...copy, singleShotMaxBytes: 1 },
      checkMd5: true,
    },
    { label: 'bare Put Block From URL, same blocks', kind: 'bare-block-from-url', checkMd5: true },
    // Each mode right before its baseline, so both meet Azurite in the same state.
    { label: 'stream', kind: 'copier', options: { ...copy, mode: 'stream' }, checkMd5: true },
    { label: 'upload from memory, same blocks', kind: 'upload-from-memory', checkMd5: true },
    {
      label: 'stream + count records',
      kind: 'copier',
      options: { ...copy, mode: 'stream', countRecords: true },
      checkMd5: true,
    },
    // What the worker's Node arguments are for (ADR 0012), side by side: the same copy with V8's own heap limits.
    ...(nodeArguments.length > 0
      ? [
          {
            label: STREAM_COUNT_NODE_DEFAULTS,
            kind: 'copier' as const,
            options: { ...copy, mode: 'stream' as const, countRecords: true },
            checkMd5: true,
            nodeArguments: [],
          },
        ]
      : []),
    { label: 'bare download + gunzip + count', kind: 'bare-download-gunzip-count', checkMd5: false },
    { label: 'download to nowhere', kind: 'download-to-nowhere', checkMd5: false },
    { label: 'naive: download whole, then upload', kind: 'naive-download-then-upload', checkMd5: true },
  ];
  const picked = flags['byte-jobs'].split(',').filter(Boolean);
  const chosen = picked.length === 0 ? jobs : jobs.filter((j) => picked.some((word) => j.label.includes(word)));
  // Azurite in memory keeps a deleted blob's bytes until its own GC (every 10 minutes), and refuses writes past half
  // of the machine's memory: say so before the first job instead of failing half-way.
  const heldMiB = sizeMiB * (1 + runs * chosen.filter((j) => j.checkMd5).length);
  const azuriteLimitMiB = totalmem() / 2 / MiB;
  if (heldMiB > azuriteLimitMiB) {
    throw new Error(
      `the bytes section would land about ${(heldMiB / 1024).toFixed(0)} GiB in Azurite's memory (the part and every ` +
        `run's copies), more than the ${(azuriteLimitMiB / 1024).toFixed(0)} GiB it accepts on this machine; ` +
        `use a smaller --size-mib, fewer --byte-runs or --byte-jobs`,
    );
  }
  process.stdout.write(`\npreparing a ${sizeMiB} MiB part… `);
  const source = await sourcePart(azurite, sizeMiB * MiB);
  const landing = await landingContainer(azurite);
  console.log(`${(source.bytes / MiB).toFixed(0)} MiB gzip, ${source.records} records`);
  const results = new Map<string, ByteJobResult[]>();
  for (let run = 0; run < runs; run++) {
    for (const job of chosen) {
      const landingPath = `bench/${job.kind}/${run}-${randomBytes(4).toString('hex')}.json.gz`;
      process.stdout.write(`  ${job.label}… `);
      const result = runJob(
        {
          kind: job.kind,
          sourceUrl: source.url,
          landingUrl: landing.url,
          landingPath,
          sizeBytes: source.bytes,
          ...(job.kind === 'upload-from-memory'
            ? { blockSizeBytes: copy.streamBufferBytes, blockConcurrency: copy.streamBuffers }
            : { blockSizeBytes: copy.blockSizeBytes, blockConcurrency: copy.blockConcurrency }),
          ...(job.options ? { copyOptions: job.options } : {}),
          ...(job.kind === 'idle-app'
            ? {
                env: {
                  AzureWebJobsStorage: azurite.customer.connectionString,
                  MDVM_LANDING_CONNECTION_STRING: azurite.customer.connectionString,
                  // Read at load time, never called: loading the app contacts nothing.
                  MDVM_DEFENDER_API_BASE_URL: 'http://127.0.0.1:9',
                  MDVM_ALLOW_LOOPBACK: 'true',
                },
              }
            : {}),
        },
        job.nodeArguments,
      );
      console.log(`${(result.ms / 1000).toFixed(1)} s, ${(result.maxRssBytes / MiB).toFixed(0)} MiB peak RSS`);
      if (!job.kind.startsWith('idle-') && result.bytes !== source.bytes) {
        failures.push(`${job.label}: moved ${result.bytes} bytes, the part has ${source.bytes}`);
      }
      if (job.options?.countRecords && result.records !== source.records) {
        failures.push(`${job.label}: counted ${result.records} records, the part has ${source.records}`);
      }
      if (job.checkMd5) {
        const blob = landing.container.getBlobClient(landingPath);
        const hash = createHash('md5');
        for await (const chunk of (await blob.download()).readableStreamBody as AsyncIterable<Buffer>)
          hash.update(chunk);
        const md5 = hash.digest('base64');
        if (md5 !== source.md5) failures.push(`${job.label}: landed md5 ${md5}, source ${source.md5}`);
        await blob.delete();
      }
      results.set(job.label, [...(results.get(job.label) ?? []), result]);
    }
  }
  const mibps = (r: ByteJobResult) => source.bytes / MiB / (r.ms / 1000);
  const rate = (label: string) => median((results.get(label) ?? []).map(mibps));
  const cpuPerGiB = (label: string) =>
    median((results.get(label) ?? []).map((r) => r.cpuMs / (source.bytes / 1024 / MiB)));
  const peak = (label: string) => Math.max(...(results.get(label) ?? []).map((r) => r.maxRssBytes)) / MiB;
  const versus: Record<string, string> = {
    'block path (Put Block From URL)': 'bare Put Block From URL, same blocks',
    stream: 'upload from memory, same blocks',
    'stream + count records': 'bare download + gunzip + count',
    [STREAM_COUNT_NODE_DEFAULTS]: 'bare download + gunzip + count',
  };
  const rows: string[][] = [];
  for (const job of chosen) {
    const label = job.label;
    const baseline = versus[label] !== undefined && results.has(versus[label]) ? versus[label] : undefined;
    const figure = {
      section: 'bytes',
      label,
      sizeBytes: source.bytes,
      runs,
      mibPerSecond: job.kind.startsWith('idle-') ? null : rate(label),
      cpuSecondsPerGiB: job.kind.startsWith('idle-') ? null : cpuPerGiB(label) / 1000,
      peakRssMiB: peak(label),
      method: results.get(label)?.[0]?.method ?? null,
      baseline: baseline ?? null,
      speedVsBaseline: baseline ? rate(label) / rate(baseline) : null,
      cpuVsBaseline: baseline ? cpuPerGiB(label) / cpuPerGiB(baseline) : null,
    };
    figures.push(figure);
    rows.push([
      label,
      figure.mibPerSecond === null ? '' : figure.mibPerSecond.toFixed(1),
      figure.speedVsBaseline === null ? '' : `${figure.speedVsBaseline.toFixed(2)}x`,
      figure.cpuSecondsPerGiB === null ? '' : figure.cpuSecondsPerGiB.toFixed(1),
      figure.cpuVsBaseline === null ? '' : `${figure.cpuVsBaseline.toFixed(2)}x`,
      figure.peakRssMiB.toFixed(0),
    ]);
  }
  printTable(
    `bytes: one ${(source.bytes / MiB).toFixed(0)} MiB part, each job in a fresh process, median of ${runs} run(s); ` +
      '"vs" compares with the baseline below it',
    ['', 'MiB/s', 'vs baseline', 'CPU s/GiB', 'CPU vs baseline', 'peak RSS MiB'],
    rows,
  );
}

async function pagedSection(stack: Stack, records: number): Promise<void> {
  const perPart = Math.ceil(records / 3);
  process.stdout.write(`\npublishing a snapshot of ${3 * perPart} records for the JSON endpoint… `);
  await stack.simulator.publish('software-vulnerabilities', { groups: [0], partsPerGroup: 2, recordsPerPart: perPart });
  console.log('done');
  const suffix = randomBytes(4).toString('hex');
  const env = {
    ...appSettings(stack, suffix),
    MDVM_EXPORTS: 'software-vulnerabilities',
    MDVM_JSON_EXPORTS: 'software-vulnerabilities',
    MDVM_JSON_PAGE_SIZE: '200000',
    MDVM_DEFENDER_TIMEOUT_MS: '600000',
    ...stack.simulator.identityEnvironment,
  };
  const jobs = [
    { label: 'JSON mode: pages of 200,000 into gzip JSON Lines parts', kind: 'json-pages' as const },
    { label: 'bare: the same pages downloaded to nowhere', kind: 'bare-json-pages' as const },
  ];
  const results = new Map<string, ByteJobResult>();
  for (const job of jobs) {
    stack.simulator.resetRateLimits();
    process.stdout.write(`  ${job.label}… `);
    const result = await runJobAsync({
      kind: job.kind,
      sourceUrl: '',
      landingUrl: '',
      landingPath: '',
      sizeBytes: 0,
      blockSizeBytes: 0,
      blockConcurrency: 0,
      env,
      exportId: 'software-vulnerabilities',
    });
    console.log(`${(result.ms / 1000).toFixed(1)} s, ${(result.maxRssBytes / MiB).toFixed(0)} MiB peak RSS`);
    results.set(job.label, result);
  }
  const app = results.get(jobs[0]?.label ?? '');
  const bare = results.get(jobs[1]?.label ?? '');
  if (app?.records !== 3 * perPart)
    failures.push(`JSON mode landed ${app?.records} records, the snapshot has ${3 * perPart}`);
  const rows: string[][] = [];
  for (const job of jobs) {
    const r = results.get(job.label);
    if (!r) continue;
    const figure = {
      section: 'paged',
      label: job.label,
      records: 3 * perPart,
      pageSize: 200_000,
      seconds: r.ms / 1000,
      recordsPerSecond: (3 * perPart) / (r.ms / 1000),
      cpuSeconds: r.cpuMs / 1000,
      peakRssMiB: r.maxRssBytes / MiB,
      landedBytes: job.kind === 'json-pages' ? r.bytes : null,
      timeVsBare: job.kind === 'json-pages' && bare ? r.ms / bare.ms : null,
    };
    figures.push(figure);
    rows.push([
      job.label,
      figure.seconds.toFixed(1),
      Math.round(figure.recordsPerSecond).toString(),
      figure.cpuSeconds.toFixed(1),
      figure.peakRssMiB.toFixed(0),
      figure.timeVsBare === null ? '' : `${figure.timeVsBare.toFixed(2)}x`,
    ]);
  }
  printTable(
    `paged: a JSON-mode snapshot of ${3 * perPart} records, each job in a fresh process`,
    ['', 's', 'records/s', 'CPU s', 'peak RSS MiB', 'time vs bare'],
    rows,
  );
}

/** Bytes on disk under these node_modules folders: what a library adds to the Functions package. */
function packageMiB(folders: readonly string[]): number {
  let bytes = 0;
  const walk = (dir: string) => {
    for (const entry of readdirSync(dir, { withFileTypes: true })) {
      const path = join(dir, entry.name);
      if (entry.isDirectory()) walk(path);
      else if (entry.isFile()) bytes += statSync(path).size;
    }
  };
  for (const folder of folders) if (existsSync(join('node_modules', folder))) walk(join('node_modules', folder));
  return bytes / MiB;
}

async function curateSection(stack: Stack, records: number): Promise<void> {
  process.stdout.write(`\nlanding a part of ${records} software-vulnerability records (stream mode, counted)… `);
  const app = await createApp(stack, {
    MDVM_EXPORTS: 'software-vulnerabilities',
    MDVM_COPY_MODE: 'stream',
    MDVM_COUNT_RECORDS: 'true',
  });
  await stack.simulator.publish('software-vulnerabilities', {
    groups: [0],
    partsPerGroup: 1,
    recordsPerPart: 10,
    largePartRecords: records,
  });
  stack.simulator.resetRateLimits();
  await app.runner.tick(['software-vulnerabilities']);
  await app.runner.drain({ timeoutInMs: 30 * 60_000 });
  const latest = JSON.parse(
    (await app.runtime.landing.getBlobClient('software-vulnerabilities/_latest.json').downloadToBuffer()).toString(),
  ) as { manifest: string };
  const manifest = JSON.parse(
    (await app.runtime.landing.getBlobClient(latest.manifest).downloadToBuffer()).toString(),
  ) as { parts: { path: string; bytes: number; records: number | null }[] };
  const part = [...manifest.parts].sort((a, b) => b.bytes - a.bytes)[0];
  if (!part || part.records !== records) {
    failures.push(`curate: the landed part has ${part?.records} records, expected ${records}`);
    return;
  }
  let jsonBytes = 0;
  const body = (await app.runtime.landing.getBlobClient(part.path).download()).readableStreamBody;
  if (body) {
    const gunzip = createGunzip();
    gunzip.on('data', (chunk: Buffer) => {
      jsonBytes += chunk.length;
    });
    await pipelineAsync(body, gunzip);
  }
  console.log(`done: ${(part.bytes / MiB).toFixed(1)} MiB gzip, ${(jsonBytes / MiB).toFixed(0)} MiB JSON`);
  const jobs = [
    {
      label: 'curated Parquet: the app (hyparquet-writer)',
      kind: 'curate-hyparquet' as const,
      library: ['hyparquet-writer', 'hyparquet'],
    },
    { label: 'curated Parquet: DuckDB read_json + COPY', kind: 'curate-duckdb' as const, library: ['@duckdb'] },
    {
      label: 'baseline: download + gunzip + parse every line',
      kind: 'bare-download-gunzip-parse' as const,
      library: [],
    },
  ];
  const results = new Map<string, ByteJobResult>();
  for (const job of jobs) {
    process.stdout.write(`  ${job.label}… `);
    const result = await runJobAsync({
      kind: job.kind,
      sourceUrl: '',
      landingUrl: '',
      landingPath: part.path,
      sizeBytes: part.bytes,
      blockSizeBytes: 0,
      blockConcurrency: 0,
      env: app.env,
      exportId: 'software-vulnerabilities',
    });
    console.log(`${(result.ms / 1000).toFixed(1)} s, ${(result.maxRssBytes / MiB).toFixed(0)} MiB peak RSS`);
    results.set(job.label, result);
    if (result.records !== records) failures.push(`${job.label}: ${result.records} rows, the part has ${records}`);
  }
  const baseline = results.get(jobs[2]?.label ?? '');
  const rows: string[][] = [];
  for (const job of jobs) {
    const r = results.get(job.label);
    if (!r) continue;
    const figure = {
      section: 'curate',
      label: job.label,
      records,
      gzipMiB: part.bytes / MiB,
      jsonMiB: jsonBytes / MiB,
      seconds: r.ms / 1000,
      jsonMiBPerSecond: jsonBytes / MiB / (r.ms / 1000),
      recordsPerSecond: records / (r.ms / 1000),
      cpuSeconds: r.cpuMs / 1000,
      peakRssMiB: r.maxRssBytes / MiB,
      parquetMiB: job.kind === 'bare-download-gunzip-parse' ? null : r.bytes / MiB,
      packageMiB: job.library.length ? packageMiB(job.library) : null,
      timeVsBaseline: baseline ? r.ms / baseline.ms : null,
    };
    figures.push(figure);
    rows.push([
      job.label,
      figure.jsonMiBPerSecond.toFixed(1),
      Math.round(figure.recordsPerSecond).toString(),
      figure.cpuSeconds.toFixed(1),
      figure.peakRssMiB.toFixed(0),
      figure.parquetMiB === null ? '' : figure.parquetMiB.toFixed(1),
      figure.packageMiB === null ? '' : figure.packageMiB.toFixed(1),
      figure.timeVsBaseline === null ? '' : `${figure.timeVsBaseline.toFixed(2)}x`,
    ]);
  }
  printTable(
    `curate: one part of ${records} records (${(part.bytes / MiB).toFixed(1)} MiB gzip, ${(jsonBytes / MiB).toFixed(0)} MiB JSON), each job in a fresh process`,
    ['', 'JSON MiB/s', 'records/s', 'CPU s', 'peak RSS MiB', 'Parquet MiB', 'package MiB', 'time vs baseline'],
    rows,
  );
}

// ---------------------------------------------------------------------------------------------------------------

function keyFigures(): string {
  const get = (label: string) => figures.find((f) => f.label === label) as Record<string, number> | undefined;
  const parts: string[] = [];
  const runs = [8, 32, 64].map((w) => get(`run, ${w} workers`)).filter((f) => f !== undefined);
  if (runs.length > 0) {
    parts.push(`run vs bare ${runs.map((f) => f.vsBare?.toFixed(2)).join('/')}`);
    parts.push(`requests/part ${runs.map((f) => f.requestsPerPart?.toFixed(1)).join('/')}`);
    parts.push(`CPU vs bare ${runs.map((f) => f.cpuVsBare?.toFixed(1)).join('/')}`);
    parts.push(`run vs floor ${runs.map((f) => f.vsFloor?.toFixed(2)).join('/')}`);
    parts.push(`CPU vs floor ${runs.map((f) => f.cpuVsFloor?.toFixed(2)).join('/')}`);
  }
  const ceiling = figures.find((f) => f.section === 'request-costs' && f.label.startsWith('sum: copy')) as
    | Record<string, number>
    | undefined;
  if (ceiling) {
    parts.push(
      `no-table ceiling ${ceiling.vsCopyAlone?.toFixed(2)}x the copy alone, ${ceiling.cpuVsCopyAlone?.toFixed(1)}x its CPU`,
    );
  }
  const tick = figures.find((f) => f.section === 'tick') as Record<string, number> | undefined;
  if (tick)
    parts.push(
      `tick ${tick.parts}: ${tick.timeVsFloor?.toFixed(2)}x time, ${tick.requestsVsFloor?.toFixed(3)}x requests`,
    );
  const block = get('block path (Put Block From URL)');
  const stream = get('stream');
  const count = get('stream + count records');
  const countWithDefaults = get(STREAM_COUNT_NODE_DEFAULTS);
  if (block && stream && count) {
    parts.push(
      `block ${block.speedVsBaseline?.toFixed(2)}x, stream ${stream.speedVsBaseline?.toFixed(2)}x, count CPU ${count.cpuVsBaseline?.toFixed(2)}x` +
        (countWithDefaults ? ` (${countWithDefaults.cpuVsBaseline?.toFixed(2)}x with V8's default heap limits)` : ''),
    );
    // The modes as deployed: the job with V8's defaults is there to show what the worker's arguments change.
    const copierPeaks = figures.filter(
      (f) => f.section === 'bytes' && (f as Record<string, unknown>).method && f.label !== STREAM_COUNT_NODE_DEFAULTS,
    );
    const appLoaded = get('process with the whole app loaded, one HEAD');
    parts.push(
      `peak RSS ${Math.round(Math.max(...copierPeaks.map((f) => Number((f as Record<string, unknown>).peakRssMiB))))} MiB` +
        (appLoaded ? ` (whole app loaded, idle: ${Math.round(appLoaded.peakRssMiB ?? 0)} MiB)` : ''),
    );
  }
  const paged = figures.find((f) => f.section === 'paged' && f.label.startsWith('JSON mode')) as
    | Record<string, number>
    | undefined;
  if (paged)
    parts.push(
      `JSON mode ${paged.records} records: peak RSS ${Math.round(paged.peakRssMiB ?? 0)} MiB, ${paged.timeVsBare?.toFixed(2)}x bare time`,
    );
  const curated = get('curated Parquet: the app (hyparquet-writer)');
  if (curated)
    parts.push(
      `curate ${curated.records} records: ${curated.jsonMiBPerSecond?.toFixed(1)} JSON MiB/s, peak RSS ${Math.round(curated.peakRssMiB ?? 0)} MiB, ${curated.timeVsBaseline?.toFixed(2)}x parse time`,
    );
  return `key figures: ${parts.join('; ')}`;
}

async function main(): Promise<number> {
  const started = performance.now();
  console.log(
    `mdvm-ingest bench on ${availableParallelism()} CPU (${cpus()[0]?.model ?? '?'}), ${(totalmem() / 1024 ** 3).toFixed(0)} GiB, Node ${process.version}; Azurite in memory`,
  );
  console.log(`child processes: node ${nodeArguments.join(' ') || "(V8's defaults)"}`);
  const stack = await startStack();
  try {
    if (sections.has('pipeline')) await pipelineSection(stack, Number(flags.parts), Number(flags.runs));
    if (sections.has('tick')) await tickSection(stack, Number(flags['tick-parts']), Number(flags['tick-runs']));
    if (sections.has('bytes')) {
      await whenAzuriteIdle(stack.azurite, 'bytes');
      await bytesSection(stack.azurite, Number(flags['size-mib']), Number(flags['byte-runs']));
    }
    if (sections.has('paged')) {
      await whenAzuriteIdle(stack.azurite, 'paged');
      await pagedSection(stack, Number(flags['paged-records']));
    }
    if (sections.has('curate')) {
      await whenAzuriteIdle(stack.azurite, 'curate');
      await curateSection(stack, Number(flags['curate-records']));
    }
  } finally {
    await stack.stop();
  }
  mkdirSync('bench', { recursive: true });
  const results = {
    at: new Date().toISOString(),
    machine: { cpus: availableParallelism(), memoryGiB: totalmem() / 1024 ** 3, node: process.version },
    flags,
    seconds: (performance.now() - started) / 1000,
    figures,
    failures,
  };
  writeFileSync('bench/results.json', `${JSON.stringify(results, null, 2)}\n`);
  console.log(
    '\nNote: Azurite copies server-side inside its own process; these figures compare code on one machine and',
  );
  console.log('say nothing about Azure throughput (docs/scaling.md has the Azure limits).');
  console.log(`bench took ${results.seconds.toFixed(0)} s; full results in bench/results.json`);
  if (failures.length > 0) {
    console.error('\nCHECKS FAILED:');
    for (const f of failures) console.error(`  ${f}`);
  }
  console.log(keyFigures());
  return failures.length > 0 ? 1 : 0;
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
