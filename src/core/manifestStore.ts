import { odata, type TableClient, type TableEntityResult, type TransactionAction } from '@azure/data-tables';
import { contractProblems, type PartRow, partRowSchema, type SnapshotRow, snapshotRowSchema } from './contracts.js';
import { classifyStorageError, isStorageCondition, MdvmError } from './errors.js';
import { decodeKey, encodeKey, partsPartitionKey } from './parts.js';

export type { PartRow, PartStatus, SnapshotRow, SnapshotStatus } from './contracts.js';

export interface Versioned<T> {
  readonly value: T;
  readonly etag: string;
}

type Entity = Record<string, unknown> & { partitionKey: string; rowKey: string };

const TRANSACTION_LIMIT = 100;

/** Drop undefined so a merge never writes a null over a value. */
function defined(entity: Record<string, unknown>): Record<string, unknown> {
  return Object.fromEntries(Object.entries(entity).filter(([, v]) => v !== undefined));
}

/** A row is checked against its contract before it is written; what is written is the row as given. */
function checked<T>(schema: typeof snapshotRowSchema | typeof partRowSchema, row: T, what: string): T {
  const result = schema.safeParse(row);
  if (!result.success) {
    throw new MdvmError(
      'fatal',
      `refusing to write a ${what} that breaks its contract: ${contractProblems(result.error)}`,
    );
  }
  return row;
}

function snapshotEntity(row: SnapshotRow): Entity {
  const { exportId, generatedTime, ...rest } = checked(
    snapshotRowSchema,
    row,
    `snapshots row ${row.exportId}/${row.generatedTime}`,
  );
  return { partitionKey: exportId, rowKey: generatedTime, ...defined(rest) };
}

function partEntity(row: PartRow): Entity {
  const { exportId, snapshotId, ...rest } = checked(partRowSchema, row, `parts row ${row.snapshotId}/${row.path}`);
  return {
    partitionKey: partsPartitionKey(exportId, snapshotId),
    rowKey: encodeKey(row.path),
    exportId,
    snapshotId,
    ...defined(rest),
  };
}

/** A row read back is parsed with its contract: a corrupted row stops here, with its keys and what is wrong. */
function fromEntity<T>(
  schema: { safeParse(value: unknown): { success: true; data: T } | { success: false; error: import('zod').ZodError } },
  raw: Record<string, unknown>,
  what: string,
): T {
  const result = schema.safeParse(raw);
  if (!result.success) {
    throw new MdvmError('fatal', `${what} breaks its contract (docs/contracts.md): ${contractProblems(result.error)}`);
  }
  return result.data;
}

/** The entity without the table's own properties. */
function properties(e: TableEntityResult<Record<string, unknown>>): Record<string, unknown> {
  const { partitionKey: _pk, rowKey: _rk, etag: _etag, timestamp: _ts, 'odata.metadata': _m, ...rest } = e;
  // A cleared error is stored as '' (a merge cannot delete a property).
  if (rest.lastError === '') delete rest.lastError;
  return rest;
}

function toSnapshot(e: TableEntityResult<Record<string, unknown>>): SnapshotRow {
  const raw = { ...properties(e), exportId: e.partitionKey, generatedTime: e.rowKey };
  return fromEntity(snapshotRowSchema, raw, `snapshots row ${e.partitionKey}/${e.rowKey}`);
}

function toPart(e: TableEntityResult<Record<string, unknown>>): PartRow {
  const rest = properties(e);
  const raw = { ...rest, path: (rest.path as string | undefined) ?? decodeKey(e.rowKey ?? '') };
  return fromEntity(partRowSchema, raw, `parts row ${e.partitionKey}/${String(raw.path)}`);
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
      if (isStorageCondition(error, 'not-found')) return undefined;
      throw classifyStorageError(error, 'read snapshot row');
    }
  }

  async listSnapshots(exportId: string): Promise<Versioned<SnapshotRow>[]> {
    const out: Versioned<SnapshotRow>[] = [];
    try {
      for await (const e of this.snapshots.listEntities<Record<string, unknown>>({
        queryOptions: { filter: odata`PartitionKey eq ${exportId}` },
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
      if (!isStorageCondition(error, 'already-exists', 'conflict'))
        throw classifyStorageError(error, 'create snapshot row');
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
      if (isStorageCondition(error, 'precondition-failed')) throw new ConcurrentUpdateError();
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
      if (isStorageCondition(error, 'not-found')) return undefined;
      throw classifyStorageError(error, 'read part row');
    }
  }

  async listParts(exportId: string, snapshotId: string): Promise<Versioned<PartRow>[]> {
    const out: Versioned<PartRow>[] = [];
    const pk = partsPartitionKey(exportId, snapshotId);
    try {
      for await (const e of this.parts.listEntities<Record<string, unknown>>({
        queryOptions: { filter: odata`PartitionKey eq ${pk}` },
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
        if (!isStorageCondition(error, 'already-exists', 'conflict'))
          throw classifyStorageError(error, 'insert part rows');
        for (const row of chunk) {
          try {
            await this.parts.createEntity(partEntity(row));
          } catch (inner) {
            if (!isStorageCondition(inner, 'already-exists', 'conflict'))
              throw classifyStorageError(inner, 'insert part row');
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
      if (isStorageCondition(error, 'precondition-failed')) throw new ConcurrentUpdateError();
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
