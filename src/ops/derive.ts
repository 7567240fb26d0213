import type { ExportId } from '../core/catalog.js';
import { runBounded } from '../core/concurrency.js';
import { errorMessage } from '../core/errors.js';
import { compareGeneratedTime } from '../core/parts.js';
import type { Runtime } from '../core/runtime.js';
import type { Telemetry } from '../core/telemetry.js';
import { buildChangeSet } from '../derive/changeSets.js';
import { completeCuratedIfReady, curatePart, readRawManifest } from '../derive/curate.js';

/**
 * `mdvm-ingest derive`: curated Parquet and change sets for snapshots that completed before they were turned on (or
 * whose derive messages were parked). Runs the same code as the derive queue, in this process, oldest snapshot first;
 * what exists already is skipped, so it can be stopped and run again. One failure does not stop the rest: it is
 * reported with its reason and the command exits 1.
 */
export interface BackfillOptions {
  /** Export types to build curated Parquet for. */
  curatedExports: readonly ExportId[];
  /** Export types to build change sets for. */
  changeSetExports: readonly ExportId[];
  /** Only snapshots generated at or after this time. */
  since?: string;
  workers: number;
  abortSignal?: AbortSignal;
  onProgress?: (progress: BackfillProgress) => void;
}

export interface BackfillProgress {
  snapshots: number;
  curatedParts: { total: number; built: number; existing: number; failed: number; rows: number };
  changeSets: { total: number; built: number; existing: number; failed: number };
}

export interface BackfillReport extends BackfillProgress {
  failures: { export: string; snapshot: string; what: string; reason: string }[];
  interrupted: boolean;
  seconds: number;
}

export async function backfillDerived(
  runtime: Runtime,
  telemetry: Telemetry,
  options: BackfillOptions,
): Promise<BackfillReport> {
  const started = Date.now();
  const report: BackfillReport = {
    snapshots: 0,
    curatedParts: { total: 0, built: 0, existing: 0, failed: 0, rows: 0 },
    changeSets: { total: 0, built: 0, existing: 0, failed: 0 },
    failures: [],
    interrupted: false,
    seconds: 0,
  };
  const progress = () => options.onProgress?.(report);
  const since = options.since;
  const work: { exportId: ExportId; generatedTime: string; snapshotId: string }[] = [];
  const exports = [...new Set([...options.curatedExports, ...options.changeSetExports])];
  for (const exportId of exports) {
    for (const { value } of await runtime.store.listSnapshots(exportId)) {
      if (value.status !== 'complete') continue;
      if (since && compareGeneratedTime(value.generatedTime, since) < 0) continue;
      work.push({ exportId, generatedTime: value.generatedTime, snapshotId: value.snapshotId });
    }
  }
  work.sort((a, b) => compareGeneratedTime(a.generatedTime, b.generatedTime));
  report.snapshots = work.length;
  report.changeSets.total = work.filter((w) => options.changeSetExports.includes(w.exportId)).length;
  progress();

  for (const snapshot of work) {
    if (options.abortSignal?.aborted) break;
    const fail = (what: string, error: unknown) =>
      report.failures.push({
        export: snapshot.exportId,
        snapshot: snapshot.snapshotId,
        what,
        reason: errorMessage(error),
      });
    let manifest: Awaited<ReturnType<typeof readRawManifest>>;
    try {
      manifest = await readRawManifest(runtime, snapshot.exportId, snapshot.snapshotId);
    } catch (error) {
      fail('_manifest.json', error);
      if (options.changeSetExports.includes(snapshot.exportId)) report.changeSets.failed++;
      progress();
      continue;
    }
    if (options.curatedExports.includes(snapshot.exportId)) {
      report.curatedParts.total += manifest.parts.length;
      progress();
      await runBounded(manifest.parts, options.workers, async (part) => {
        if (options.abortSignal?.aborted) return;
        try {
          const result = await curatePart(runtime, telemetry, manifest, part.path, {
            ...(options.abortSignal ? { abortSignal: options.abortSignal } : {}),
          });
          if (result.outcome === 'landed') report.curatedParts.built++;
          else report.curatedParts.existing++;
          report.curatedParts.rows += result.rows;
        } catch (error) {
          report.curatedParts.failed++;
          fail(part.path, error);
        }
        progress();
      });
      try {
        await completeCuratedIfReady(runtime, telemetry, manifest);
      } catch (error) {
        fail('curated _manifest.json', error);
      }
    }
    if (options.changeSetExports.includes(snapshot.exportId) && !options.abortSignal?.aborted) {
      try {
        const result = await buildChangeSet(runtime, telemetry, manifest, {
          ...(options.abortSignal ? { abortSignal: options.abortSignal } : {}),
        });
        if (result.outcome === 'landed') report.changeSets.built++;
        else report.changeSets.existing++;
      } catch (error) {
        report.changeSets.failed++;
        fail('change set', error);
      }
      progress();
    }
  }
  report.interrupted = options.abortSignal?.aborted === true;
  report.seconds = (Date.now() - started) / 1000;
  return report;
}
