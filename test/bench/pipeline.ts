/**
 * `npm run bench:pipeline`: parts/s, HTTP requests per part (by kind) and client CPU per part through the
 * in-process host at 8, 32 and 64 workers, side by side with a bare Copy Blob From URL loop over the same parts at
 * concurrency 32, in one run against one Azurite. Reports; asserts nothing. Writes bench/pipeline-results.json.
 * Flags: --parts N (default 400).
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { createRequire, syncBuiltinESMExports } from 'node:module';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { getExportType } from '../../src/core/catalog.js';
import { runBounded } from '../../src/core/concurrency.js';
import { createApp, startStack, tableRows } from '../helpers/stack.js';

const { values } = parseArgs({ options: { parts: { type: 'string', default: '400' } } });
const PARTS = Number(values.parts);
const EXPORT = 'software-inventory-noncpe' as const;
const GROUPS = 10;

/** Every HTTP request this process makes, by kind: service, method and operation. */
const counts = new Map<string, number>();
function countRequests(): void {
  const require = createRequire(import.meta.url);
  for (const name of ['node:http', 'node:https']) {
    const mod = require(name) as typeof import('node:http');
    const original = mod.request;
    mod.request = ((...args: Parameters<typeof original>) => {
      const [first] = args;
      const options = (typeof first === 'string' || first instanceof URL ? new URL(first) : first) as {
        method?: string;
        path?: string | null;
        pathname?: string;
        search?: string;
      };
      const path = options.path ?? `${options.pathname ?? ''}${options.search ?? ''}`;
      counts.set(kindOf(options.method ?? 'GET', path), (counts.get(kindOf(options.method ?? 'GET', path)) ?? 0) + 1);
      return original(...args);
    }) as typeof original;
  }
  syncBuiltinESMExports();
}

function kindOf(method: string, path: string): string {
  const comp = /[?&]comp=([a-z]+)/i.exec(path)?.[1];
  if (/\/messages/.test(path)) return `queue ${method}`;
  if (/\$batch|^\/[^/]+\/(snapshots|parts)[0-9a-f]*/.test(path) || /Tables/.test(path)) return `table ${method}`;
  return `blob ${method}${comp ? ` ${comp}` : ''}`;
}

function snapshotOfCounts(): Map<string, number> {
  return new Map(counts);
}

function delta(before: Map<string, number>): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [kind, n] of counts) {
    const d = n - (before.get(kind) ?? 0);
    if (d > 0) out[kind] = d;
  }
  return out;
}

interface Result {
  readonly label: string;
  readonly partsPerSecond: number;
  readonly requestsPerPart: number;
  readonly cpuMsPerPart: number;
  readonly complete: boolean | null;
  readonly requestsByKind: Record<string, number>;
}

async function main(): Promise<void> {
  countRequests();
  const stack = await startStack();
  const results: Result[] = [];
  try {
    await stack.simulator.publish(EXPORT, {
      generatedTime: '2026-11-21T12:01:00Z',
      groups: Array.from({ length: GROUPS }, (_, i) => i),
      partsPerGroup: Math.max(1, Math.round(PARTS / GROUPS) - 1),
      recordsPerPart: 2,
    });

    // Baseline: the same SAS URLs copied with a bare Copy Blob From URL loop, concurrency 32.
    const bare = await createApp(stack, { MDVM_EXPORTS: EXPORT });
    const { exportFiles } = await bare.runtime.defender.getExportFiles(getExportType(EXPORT), { sasValidHours: 1 });
    await bare.runtime.landing.createIfNotExists();
    results.push(
      await measure('bare Copy Blob From URL loop, concurrency 32', exportFiles.length, async () => {
        await runBounded(exportFiles, 32, (url, i) =>
          bare.runtime.landing.getBlockBlobClient(`bare/${i}.json.gz`).syncCopyFromURL(url),
        );
        return null;
      }),
    );

    for (const workers of [8, 32, 64]) {
      const app = await createApp(stack, { MDVM_EXPORTS: EXPORT }, { workers });
      const tick = await measure(
        `tick that records and enqueues, before ${workers} workers`,
        exportFiles.length,
        async () => {
          await app.runner.tick();
          return null;
        },
      );
      if (workers === 8) results.push(tick);
      results.push(
        await measure(`run, ${workers} workers`, exportFiles.length, async () => {
          await app.runner.drain();
          const [row] = await tableRows(app.runtime.storage.snapshotsTable);
          return row?.status === 'complete';
        }),
      );
    }
  } finally {
    await stack.stop();
  }

  const baseline = results.find((r) => r.label.startsWith('bare'))?.partsPerSecond ?? 1;
  const header = ['', 'parts/s', 'vs bare', 'requests/part', 'CPU ms/part', 'complete'];
  const rows = results.map((r) => [
    r.label,
    r.partsPerSecond.toFixed(1),
    `${(r.partsPerSecond / baseline).toFixed(2)}x`,
    r.requestsPerPart.toFixed(1),
    r.cpuMsPerPart.toFixed(1),
    r.complete === null ? '' : String(r.complete),
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) => cells.map((c, i) => c.padEnd(widths[i] ?? 0)).join(' | ');
  console.log(`${PARTS} parts of one export through the pipeline (Azurite, this machine)`);
  console.log(line(header));
  for (const row of rows) console.log(line(row));
  for (const r of results) console.log(`  ${r.label}: ${JSON.stringify(r.requestsByKind)}`);
  mkdirSync('bench', { recursive: true });
  writeFileSync('bench/pipeline-results.json', `${JSON.stringify({ parts: PARTS, results }, null, 2)}\n`);
}

async function measure(label: string, parts: number, work: () => Promise<boolean | null>): Promise<Result> {
  const before = snapshotOfCounts();
  const cpu = process.cpuUsage();
  const started = performance.now();
  const complete = await work();
  const seconds = (performance.now() - started) / 1000;
  const used = process.cpuUsage(cpu);
  const requestsByKind = delta(before);
  const requests = Object.values(requestsByKind).reduce((a, b) => a + b, 0);
  return {
    label,
    partsPerSecond: parts / seconds,
    requestsPerPart: requests / parts,
    cpuMsPerPart: (used.user + used.system) / 1000 / parts,
    complete,
    requestsByKind,
  };
}

await main();
