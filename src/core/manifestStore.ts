import type { TableClient, TableEntityResult, TransactionAction } from '@azure/data-tables';
import { classifyStorageError } from './errors.js';
import { decodeKey, encodeKey, partsPartitionKey } from './parts.js';

export type SnapshotStatus = 'requested' | 'copying' | 'complete' | 'superseded' | 'failed';
export type PartStatus = 'queued' | 'landed' | 'expired' | 'failed';

/** `snapshots` table (contract, DESIGN §3): PartitionKey = export id, RowKey = generatedTime. */
export interface SnapshotRow {
  exportId: string;
  generatedTime: string;
  snapshotId: string;
  status: SnapshotStatus;
  partCount: number;
  partsLanded: number;
  bytesLanded: number;
  recordsLanded?: number | undefined;
  requestedAt: string;
  lastRequestedAt: string;
  completedAt?: string | undefined;
  manifestPath?: string | undefined;
  supersededBy?: string | undefined;
  lastError?: string | undefined;
}

/** `parts` table (contract): PartitionKey = `{export}_{snapshot}`, RowKey = encoded part path. */
export interface PartRow {
  exportId: string;
  snapshotId: string;
  path: string;
  sourcePath: string;
  landingPath: string;
  status: PartStatus;
  attempts: number;
  bytes?: number | undefined;
  md5?: string | undefined;
  records?: number | undefined;
  durationMs?: number | undefined;
  copyMethod?: string | undefined;
  /** `md5` or `length`: what the landed bytes were checked with (see CopyResult.verification). */
  verification?: string | undefined;
  lastError?: string | undefined;
  sasExpiresOn?: string | undefined;
  queuedAt?: string | undefined;
  landedAt?: string | undefined;
}

export interface Versioned<T> {
  readonly value: T;
  readonly etag: string;
}

type Entity = Record<string, unknown> & { partitionKey: string; rowKey: string };

const TRANSACTION_LIMIT = 100;

function statusCode(error: unknown): number | undefined {
  return (error as { statusCode?: number }).statusCode;
}

/** Drop undefined so a merge never writes a null over a value. */
function defined(entity: Record<string, unknown>): Record<string, unknown> {
  return Object.fromEntries(Object.entries(entity).filter(([, v]) => v !== undefined));
}

function snapshotEntity(row: SnapshotRow): Entity {
  const { exportId, generatedTime, ...rest } = row;
  return { partitionKey: exportId, rowKey: generatedTime, ...defined(rest) };
}

function partEntity(row: PartRow): Entity {
  const { exportId, snapshotId, ...rest } = row;
  return {
    partitionKey: partsPartitionKey(exportId, snapshotId),
    rowKey: encodeKey(row.path),
    exportId,
    snapshotId,
    ...defined(rest),
  };
}

function toSnapshot(e: TableEntityResult<Record<string, unknown>>): SnapshotRow {
  const {
    partitionKey,
    rowKey,
    etag: _etag,
    timestamp: _ts,
    'odata.metadata': _m,
    ...rest
  } = e as Entity & {
    etag: string;
  };
  const row: SnapshotRow = {
    ...(rest as Omit<SnapshotRow, 'exportId' | 'generatedTime'>),
    exportId: partitionKey,
    generatedTime: rowKey,
  };
  if (row.lastError === '') row.lastError = undefined;
  return row;
}

function toPart(e: TableEntityResult<Record<string, unknown>>): PartRow {
  const {
    partitionKey: _pk,
    rowKey,
    etag: _etag,
    timestamp: _ts,
    'odata.metadata': _m,
    ...rest
  } = e as Entity & {
    etag: string;
  };
  const row: PartRow = {
    ...(rest as Omit<PartRow, 'path'>),
    path: (rest.path as string | undefined) ?? decodeKey(rowKey),
  };
  if (row.lastError === '') row.lastError = undefined;
  return row;
}

/** Thrown by conditional updates when someone else changed the row first. */
export class ConcurrentUpdateError extends Error {
  constructor() {
    super('the row changed since it was read (ETag mismatch)');
  }
}

export class ManifestStore {
  constructor(
    private readonly snapshots: TableClient,
    private readonly parts: TableClient,
  ) {}

  async getSnapshot(exportId: string, generatedTime: string): Promise<Versioned<SnapshotRow> | undefined> {
    try {
      const e = await this.snapshots.getEntity<Record<string, unknown>>(exportId, generatedTime);
      return { value: toSnapshot(e), etag: e.etag };
    } catch (error) {
      if (statusCode(error) === 404) return undefined;
      throw classifyStorageError(error, 'read snapshot row');
    }
  }

  async listSnapshots(exportId: string): Promise<Versioned<SnapshotRow>[]> {
    const out: Versioned<SnapshotRow>[] = [];
    try {
      for await (const e of this.snapshots.listEntities<Record<string, unknown>>({
        queryOptions: { filter: `PartitionKey eq '${exportId.replace(/'/g, "''")}'` },
      })) {
        out.push({ value: toSnapshot(e), etag: e.etag });
      }
    } catch (error) {
      throw classifyStorageError(error, 'list snapshot rows');
    }
    return out.sort((a, b) => a.value.generatedTime.localeCompare(b.value.generatedTime));
  }

  /** Insert; if a concurrent caller inserted first, return theirs. */
  async createSnapshot(row: SnapshotRow): Promise<Versioned<SnapshotRow>> {
    try {
      await this.snapshots.createEntity(snapshotEntity(row));
    } catch (error) {
      if (statusCode(error) !== 409) throw classifyStorageError(error, 'create snapshot row');
    }
    const created = await this.getSnapshot(row.exportId, row.generatedTime);
    if (!created) throw classifyStorageError(new Error('snapshot row vanished after insert'), 'create snapshot row');
    return created;
  }

  /** Merge `changes` only if the row still has `etag`; ConcurrentUpdateError otherwise. */
  async updateSnapshot(current: Versioned<SnapshotRow>, changes: Partial<SnapshotRow>): Promise<void> {
    const entity = snapshotEntity({ ...current.value, ...changes });
    try {
      await this.snapshots.updateEntity(entity, 'Merge', { etag: current.etag });
    } catch (error) {
      if (statusCode(error) === 412) throw new ConcurrentUpdateError();
      throw classifyStorageError(error, 'update snapshot row');
    }
  }

  /**
   * Read-modify-write with optimistic concurrency, retried until it sticks.
   * `change` returns undefined to leave the row alone.
   */
  async mutateSnapshot(
    exportId: string,
    generatedTime: string,
    change: (row: SnapshotRow) => Partial<SnapshotRow> | undefined,
  ): Promise<SnapshotRow | undefined> {
    const result = await optimistically(
      () => this.getSnapshot(exportId, generatedTime),
      (current, changes) => this.updateSnapshot(current, changes),
      change,
      'snapshot row',
    );
    return result?.value;
  }

  async getPart(exportId: string, snapshotId: string, path: string): Promise<Versioned<PartRow> | undefined> {
    try {
      const e = await this.parts.getEntity<Record<string, unknown>>(
        partsPartitionKey(exportId, snapshotId),
        encodeKey(path),
      );
      return { value: toPart(e), etag: e.etag };
    } catch (error) {
      if (statusCode(error) === 404) return undefined;
      throw classifyStorageError(error, 'read part row');
    }
  }

  async listParts(exportId: string, snapshotId: string): Promise<Versioned<PartRow>[]> {
    const out: Versioned<PartRow>[] = [];
    const pk = partsPartitionKey(exportId, snapshotId).replace(/'/g, "''");
    try {
      for await (const e of this.parts.listEntities<Record<string, unknown>>({
        queryOptions: { filter: `PartitionKey eq '${pk}'` },
      })) {
        out.push({ value: toPart(e), etag: e.etag });
      }
    } catch (error) {
      throw classifyStorageError(error, 'list part rows');
    }
    return out;
  }

  /**
   * Insert part rows that do not exist yet, in transactions of at most 100 (one partition).
   * A transaction that collides with a concurrent insert falls back to row-by-row inserts.
   */
  async insertParts(rows: readonly PartRow[]): Promise<void> {
    for (let i = 0; i < rows.length; i += TRANSACTION_LIMIT) {
      const chunk = rows.slice(i, i + TRANSACTION_LIMIT);
      const actions: TransactionAction[] = chunk.map((row) => ['create', partEntity(row)]);
      try {
        await this.parts.submitTransaction(actions);
      } catch (error) {
        if (statusCode(error) !== 409) throw classifyStorageError(error, 'insert part rows');
        for (const row of chunk) {
          try {
            await this.parts.createEntity(partEntity(row));
          } catch (inner) {
            if (statusCode(inner) !== 409) throw classifyStorageError(inner, 'insert part row');
          }
        }
      }
    }
  }

  async updatePart(current: Versioned<PartRow>, changes: Partial<PartRow>): Promise<void> {
    const entity = partEntity({ ...current.value, ...changes });
    try {
      await this.parts.updateEntity(entity, 'Merge', { etag: current.etag });
    } catch (error) {
      if (statusCode(error) === 412) throw new ConcurrentUpdateError();
      throw classifyStorageError(error, 'update part row');
    }
  }

  /** Like mutateSnapshot, for a part row. Returns the row as written, or undefined if left alone. */
  async mutatePart(
    exportId: string,
    snapshotId: string,
    path: string,
    change: (row: PartRow) => Partial<PartRow> | undefined,
  ): Promise<PartRow | undefined> {
    const result = await optimistically(
      () => this.getPart(exportId, snapshotId, path),
      (current, changes) => this.updatePart(current, changes),
      change,
      'part row',
    );
    return result?.changed ? result.value : undefined;
  }
}

/**
 * Read-modify-write with optimistic concurrency (ETag), retried with jitter until it sticks.
 * `change` returns undefined to leave the row alone. Undefined when the row does not exist.
 */
async function optimistically<T>(
  read: () => Promise<Versioned<T> | undefined>,
  write: (current: Versioned<T>, changes: Partial<T>) => Promise<void>,
  change: (row: T) => Partial<T> | undefined,
  what: string,
): Promise<{ value: T; changed: boolean } | undefined> {
  for (let attempt = 0; attempt < 50; attempt++) {
    const current = await read();
    if (!current) return undefined;
    const changes = change(current.value);
    if (!changes) return { value: current.value, changed: false };
    try {
      await write(current, changes);
      return { value: { ...current.value, ...changes }, changed: true };
    } catch (error) {
      if (!(error instanceof ConcurrentUpdateError)) throw error;
      await new Promise((r) => setTimeout(r, Math.random() * 20 * (attempt + 1)));
    }
  }
  throw classifyStorageError(new Error(`too much contention on the ${what}`), `update ${what}`);
}
