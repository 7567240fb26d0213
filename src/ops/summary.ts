import type { LandedExportId } from '../core/catalog.js';
import type { Runtime } from '../core/runtime.js';

export interface ExportSummary {
  readonly exportId: LandedExportId;
  readonly snapshot: string;
  readonly status: string;
  readonly partsLanded: number;
  readonly partCount: number;
  readonly expired: number;
  readonly failed: number;
  /** Parts waiting for a copy (their message is on the queue or being handled). */
  readonly queued: number;
  readonly bytes: number;
  readonly records: number | undefined;
  readonly manifest: string | undefined;
  readonly lastError: string | undefined;
}

/**
 * One snapshot of each export, read back from the manifest tables: the one named in `snapshots` (what a run asked
 * for), else the newest.
 */
export async function summarize(
  runtime: Runtime,
  exportIds: readonly LandedExportId[],
  snapshots: ReadonlyMap<string, string> = new Map(),
): Promise<ExportSummary[]> {
  return Promise.all(
    exportIds.map(async (exportId) => {
      const rows = (await runtime.store.listSnapshots(exportId)).map((r) => r.value);
      const asked = snapshots.get(exportId);
      const newest = rows.find((r) => r.snapshotId === asked) ?? rows.at(-1);
      if (!newest) {
        return {
          exportId,
          snapshot: '-',
          status: 'none',
          partsLanded: 0,
          partCount: 0,
          expired: 0,
          failed: 0,
          queued: 0,
          bytes: 0,
          records: undefined,
          manifest: undefined,
          lastError: undefined,
        };
      }
      const parts = (await runtime.store.listParts(exportId, newest.snapshotId)).map((p) => p.value);
      const landed = parts.filter((p) => p.status === 'landed');
      const counted = landed.length > 0 && landed.every((p) => p.records !== undefined);
      return {
        exportId,
        snapshot: newest.snapshotId,
        status: newest.status,
        partsLanded: landed.length,
        partCount: newest.partCount,
        expired: parts.filter((p) => p.status === 'expired').length,
        failed: parts.filter((p) => p.status === 'failed').length,
        queued: parts.filter((p) => p.status === 'queued').length,
        bytes: landed.reduce((sum, p) => sum + (p.bytes ?? 0), 0),
        records: counted ? landed.reduce((sum, p) => sum + (p.records ?? 0), 0) : undefined,
        manifest: newest.manifestPath,
        lastError: newest.lastError,
      };
    }),
  );
}

export function formatBytes(bytes: number): string {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
}

/** A plain-text table: one row per export. `throughput` maps export id → MiB/s of this run. */
export function renderTable(
  rows: readonly ExportSummary[],
  throughput: ReadonlyMap<string, number> = new Map(),
  notes: ReadonlyMap<string, string> = new Map(),
): string {
  const header = [
    'export',
    'snapshot',
    'parts',
    'bytes',
    'records',
    'MiB/s',
    'status',
    ...(notes.size ? ['note'] : []),
  ];
  const body = rows.map((r) => {
    const problems = [r.expired ? `${r.expired} expired` : '', r.failed ? `${r.failed} failed` : '']
      .filter(Boolean)
      .join(', ');
    const mibs = throughput.get(r.exportId);
    return [
      r.exportId,
      r.snapshot,
      `${r.partsLanded}/${r.partCount}`,
      formatBytes(r.bytes),
      r.records === undefined ? '-' : String(r.records),
      mibs === undefined ? '-' : mibs.toFixed(1),
      problems ? `${r.status} (${problems})` : r.status,
      ...(notes.size ? [notes.get(r.exportId) ?? ''] : []),
    ];
  });
  return formatColumns(header, body);
}

/** Left-aligned columns two spaces apart, a dashed rule under the header. */
export function formatColumns(header: readonly string[], body: readonly string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((row) => (row[i] ?? '').length)));
  const line = (cells: readonly string[]) =>
    cells
      .map((c, i) => c.padEnd(widths[i] ?? 0))
      .join('  ')
      .trimEnd();
  return [line(header), line(widths.map((w) => '-'.repeat(w))), ...body.map(line)].join('\n');
}
