import { odata, type TableClient, type TableEntityResult, type TransactionAction } from '@azure/data-tables';
import type { ZodType } from 'zod';
import { contractProblems, type PartRow, partRowSchema, type SnapshotRow, snapshotRowSchema } from './contracts.js';
import { classifyStorageError, isStorageCondition, MdvmError } from './errors.js';
import { compareGeneratedTime, decodeKey, encodeKey, partsPartitionKey } from './parts.js';

export type { PartRow, PartStatus, SnapshotRow, SnapshotStatus } from './contracts.js';

export interface Versioned<T> {
  readonly value: T;
  readonly etag: string;
}

/** Thrown by conditional updates when someone else changed the row first. */
export class ConcurrentUpdateError extends Error {
  constructor() {
    super('the row changed since it was read (ETag mismatch)');
  }
}

type Entity = Record<string, unknown> & { partitionKey: string; rowKey: string };

const TRANSACTION_LIMIT = 100;

/**
 * How long a copy trusts a snapshot's "not superseded" answer before asking the table again. Superseding is rare
 * (a newer snapshot while this one is still copying) and copying a superseded part harms nothing: it never enters
 * a manifest. Reading the row once per part instead would cost one request in every six.
 */
export const SNAPSHOT_STATUS_MAX_AGE_IN_MS = 30_000;

/** How one kind of row maps to a table entity, and the contract it is checked against both ways. */
interface RowMapping<T> {
  /** `snapshots row`, `parts row`: names the row in errors. */
  readonly what: string;
  readonly schema: ZodType<T>;
  readonly keysOf: (row: T) => { partitionKey: string; rowKey: string };
  /** The row's own properties from an entity's (the table's keys and system properties already removed). */
  readonly fromProperties: (properties: Record<string, unknown>, partitionKey: string, rowKey: string) => unknown;
  /** Properties the keys already carry and the entity does not repeat. */
  readonly keyFields: readonly (keyof T & string)[];
}

/**
 * One table of contract-checked rows: read, list, create, insert in transactions, and read-modify-write under the
 * row's ETag. Every row is parsed with its schema when written and when read.
 */
class RowTable<T extends object> {
  constructor(
    private readonly table: TableClient,
    private readonly mapping: RowMapping<T>,
  ) {}

  async get(partitionKey: string, rowKey: string): Promise<Versioned<T> | undefined> {
    try {
      const e = await this.table.getEntity<Record<string, unknown>>(partitionKey, rowKey);
      return { value: this.toRow(e), etag: e.etag };
    } catch (error) {
      if (isStorageCondition(error, 'not-found')) return undefined;
      throw classifyStorageError(error, `read ${this.mapping.what}`);
    }
  }

  async list(partitionKey: string): Promise<Versioned<T>[]> {
    const out: Versioned<T>[] = [];
    try {
      for await (const e of this.table.listEntities<Record<string, unknown>>({
        queryOptions: { filter: odata`PartitionKey eq ${partitionKey}` },
      })) {
        out.push({ value: this.toRow(e), etag: e.etag });
      }
    } catch (error) {
      throw classifyStorageError(error, `list ${this.mapping.what}s`);
    }
    return out;
  }

  /**
   * Only the named properties of the rows of a partition that match `filter` (an odata expression), unparsed:
   * a projection is not a row, so no contract applies. Follows continuation tokens lazily; stop early by breaking.
   */
  async *project(
    partitionKey: string,
    filter: string,
    select: string[],
    options: { pageSize?: number } = {},
  ): AsyncIterable<Record<string, unknown>> {
    try {
      const pages = this.table
        .listEntities<Record<string, unknown>>({
          queryOptions: { filter: `${odata`PartitionKey eq ${partitionKey}`} and (${filter})`, select },
        })
        .byPage(options.pageSize ? { maxPageSize: options.pageSize } : {});
      for await (const page of pages) yield* page;
    } catch (error) {
      throw classifyStorageError(error, `query ${this.mapping.what}s`);
    }
  }

  /** Insert; if a concurrent caller inserted first, theirs stands. Returns the row as stored. */
  async create(row: T): Promise<Versioned<T>> {
    const entity = this.toEntity(row);
    try {
      await this.table.createEntity(entity);
    } catch (error) {
      if (!isStorageCondition(error, 'already-exists', 'conflict')) {
        throw classifyStorageError(error, `create ${this.mapping.what}`);
      }
    }
    const created = await this.get(entity.partitionKey, entity.rowKey);
    if (!created) throw classifyStorageError(new Error('row vanished after insert'), `create ${this.mapping.what}`);
    return created;
  }

  /**
   * Insert rows that do not exist yet, in transactions of at most 100 (callers pass one partition).
   * A transaction that collides with a concurrent insert falls back to row-by-row inserts.
   */
  async insertMany(rows: readonly T[]): Promise<void> {
    for (let i = 0; i < rows.length; i += TRANSACTION_LIMIT) {
      const entities = rows.slice(i, i + TRANSACTION_LIMIT).map((row) => this.toEntity(row));
      const actions: TransactionAction[] = entities.map((entity) => ['create', entity]);
      try {
        await this.table.submitTransaction(actions);
      } catch (error) {
        if (!isStorageCondition(error, 'already-exists', 'conflict')) {
          throw classifyStorageError(error, `insert ${this.mapping.what}s`);
        }
        for (const entity of entities) {
          try {
            await this.table.createEntity(entity);
          } catch (inner) {
            if (!isStorageCondition(inner, 'already-exists', 'conflict')) {
              throw classifyStorageError(inner, `insert ${this.mapping.what}`);
            }
          }
        }
      }
    }
  }

  /**
   * Merge the same few properties into existing rows of one partition, unconditionally, 100 to a transaction.
   * Only for properties that are right whatever state the row is in now (no ETag, no read).
   */
  async mergeMany(
    partitionKey: string,
    changes: readonly { rowKey: string; properties: Record<string, string | number> }[],
  ): Promise<void> {
    for (let i = 0; i < changes.length; i += TRANSACTION_LIMIT) {
      const actions: TransactionAction[] = changes
        .slice(i, i + TRANSACTION_LIMIT)
        .map(({ rowKey, properties }) => ['update', { partitionKey, rowKey, ...properties }, 'Merge']);
      try {
        await this.table.submitTransaction(actions);
      } catch (error) {
        throw classifyStorageError(error, `update ${this.mapping.what}s`);
      }
    }
  }

  /** Merge `changes` only if the row still has `etag`; ConcurrentUpdateError otherwise. */
  async update(current: Versioned<T>, changes: Partial<T>): Promise<void> {
    try {
      await this.table.updateEntity(this.toEntity({ ...current.value, ...changes }), 'Merge', { etag: current.etag });
    } catch (error) {
      if (isStorageCondition(error, 'precondition-failed')) throw new ConcurrentUpdateError();
      throw classifyStorageError(error, `update ${this.mapping.what}`);
    }
  }

  /** Delete the row only if it still has its ETag (ConcurrentUpdateError otherwise); one already gone is fine. */
  async remove(current: Versioned<T>): Promise<void> {
    const entity = this.toEntity(current.value);
    try {
      await this.table.deleteEntity(entity.partitionKey, entity.rowKey, { etag: current.etag });
    } catch (error) {
      if (isStorageCondition(error, 'not-found')) return;
      if (isStorageCondition(error, 'precondition-failed')) throw new ConcurrentUpdateError();
      throw classifyStorageError(error, `delete ${this.mapping.what}`);
    }
  }

  /**
   * Read-modify-write with optimistic concurrency (ETag), retried with jitter until it sticks. `change` returns
   * undefined to leave the row alone. Undefined when the row does not exist.
   */
  async mutate(
    partitionKey: string,
    rowKey: string,
    change: (row: T) => Partial<T> | undefined,
  ): Promise<{ value: T; changed: boolean } | undefined> {
    for (let attempt = 0; attempt < 50; attempt++) {
      const current = await this.get(partitionKey, rowKey);
      if (!current) return undefined;
      const changes = change(current.value);
      if (!changes) return { value: current.value, changed: false };
      try {
        await this.update(current, changes);
        return { value: { ...current.value, ...changes }, changed: true };
      } catch (error) {
        if (!(error instanceof ConcurrentUpdateError)) throw error;
        await new Promise((r) => setTimeout(r, Math.random() * 20 * (attempt + 1)));
      }
    }
    const what = this.mapping.what;
    throw classifyStorageError(new Error(`too much contention on the ${what}`), `update ${what}`);
  }

  /** The entity for a row, after checking the row against its contract; the row is written as given. */
  private toEntity(row: T): Entity {
    const keys = this.mapping.keysOf(row);
    const result = this.mapping.schema.safeParse(row);
    if (!result.success) {
      throw new MdvmError(
        'fatal',
        `refusing to write a ${this.mapping.what} ${keys.partitionKey}/${keys.rowKey} that breaks its contract: ${contractProblems(result.error)}`,
      );
    }
    // Undefined is dropped so a merge never writes a null over a value.
    const properties = Object.entries(row).filter(
      ([key, value]) => value !== undefined && !(this.mapping.keyFields as readonly string[]).includes(key),
    );
    return { ...keys, ...Object.fromEntries(properties) };
  }

  /** A row read back is parsed with its contract: a corrupted row stops here, with its keys and what is wrong. */
  private toRow(e: TableEntityResult<Record<string, unknown>>): T {
    const { partitionKey, rowKey, etag: _etag, timestamp: _ts, 'odata.metadata': _m, ...properties } = e;
    // A cleared error or SAS expiry is stored as '' (a merge cannot delete a property).
    for (const clearable of ['lastError', 'sasExpiresOn'])
      if (properties[clearable] === '') delete properties[clearable];
    const raw = this.mapping.fromProperties(properties, partitionKey ?? '', rowKey ?? '');
    const result = this.mapping.schema.safeParse(raw);
    if (!result.success) {
      const name = `${partitionKey}/${(raw as { path?: string }).path ?? rowKey}`;
      throw new MdvmError(
        'fatal',
        `${this.mapping.what} ${name} breaks its contract (docs/contracts.md): ${contractProblems(result.error)}`,
      );
    }
    return result.data;
  }
}

/** `snapshots`: PartitionKey = export id, RowKey = generatedTime. */
const SNAPSHOT_ROWS: RowMapping<SnapshotRow> = {
  what: 'snapshots row',
  schema: snapshotRowSchema,
  keysOf: (row) => ({ partitionKey: row.exportId, rowKey: row.generatedTime }),
  fromProperties: (properties, partitionKey, rowKey) => ({
    ...properties,
    exportId: partitionKey,
    generatedTime: rowKey,
  }),
  keyFields: ['exportId', 'generatedTime'],
};

/** `parts`: PartitionKey = `{export}_{snapshot}`, RowKey = encoded part path (the row also keeps `path`). */
const PART_ROWS: RowMapping<PartRow> = {
  what: 'parts row',
  schema: partRowSchema,
  keysOf: (row) => ({ partitionKey: partsPartitionKey(row.exportId, row.snapshotId), rowKey: encodeKey(row.path) }),
  fromProperties: (properties, _partitionKey, rowKey) => ({
    ...properties,
    path: (properties.path as string | undefined) ?? decodeKey(rowKey),
  }),
  keyFields: [],
};

/** The manifest tables: what the tick records and the copies update. */
export class ManifestStore {
  private readonly snapshots: RowTable<SnapshotRow>;
  private readonly parts: RowTable<PartRow>;
  /** `supersededBy` (or undefined) of snapshots this process looked at, by `export/generatedTime`. */
  private readonly supersededMemo = new Map<string, { supersededBy: string | undefined; readAtMs: number }>();

  constructor(
    snapshotsTable: TableClient,
    partsTable: TableClient,
    private readonly options: { snapshotStatusMaxAgeInMs?: number; nowInMs?: () => number } = {},
  ) {
    this.snapshots = new RowTable(snapshotsTable, SNAPSHOT_ROWS);
    this.parts = new RowTable(partsTable, PART_ROWS);
  }

  /**
   * Which snapshot superseded this one, if any, as seen at most SNAPSHOT_STATUS_MAX_AGE_IN_MS ago by this process
   * (writes through this store are seen at once). A missing row reads as not superseded: the part row decides.
   */
  async supersededBy(exportId: string, generatedTime: string): Promise<string | undefined> {
    const key = `${exportId}/${generatedTime}`;
    const now = this.options.nowInMs?.() ?? Date.now();
    const known = this.supersededMemo.get(key);
    const maxAge = this.options.snapshotStatusMaxAgeInMs ?? SNAPSHOT_STATUS_MAX_AGE_IN_MS;
    if (known && (known.supersededBy !== undefined || now - known.readAtMs < maxAge)) return known.supersededBy;
    const row = await this.getSnapshot(exportId, generatedTime);
    this.remember(exportId, generatedTime, row?.value, now);
    return this.supersededMemo.get(key)?.supersededBy;
  }

  private remember(exportId: string, generatedTime: string, row: SnapshotRow | undefined, nowInMs: number): void {
    // Bounded: a process sees a handful of live snapshots; old entries go first.
    if (this.supersededMemo.size >= 1_000) this.supersededMemo.clear();
    this.supersededMemo.set(`${exportId}/${generatedTime}`, {
      supersededBy: row?.status === 'superseded' ? (row.supersededBy ?? 'a newer snapshot') : undefined,
      readAtMs: nowInMs,
    });
  }

  getSnapshot(exportId: string, generatedTime: string): Promise<Versioned<SnapshotRow> | undefined> {
    return this.snapshots.get(exportId, generatedTime);
  }

  /** Every snapshot of an export, oldest first. */
  async listSnapshots(exportId: string): Promise<Versioned<SnapshotRow>[]> {
    const rows = await this.snapshots.list(exportId);
    return rows.sort((a, b) => compareGeneratedTime(a.value.generatedTime, b.value.generatedTime));
  }

  /** Insert; if a concurrent caller inserted first, return theirs. */
  createSnapshot(row: SnapshotRow): Promise<Versioned<SnapshotRow>> {
    return this.snapshots.create(row);
  }

  updateSnapshot(current: Versioned<SnapshotRow>, changes: Partial<SnapshotRow>): Promise<void> {
    return this.snapshots.update(current, changes);
  }

  /** Read-modify-write under the row's ETag until it sticks; `change` returns undefined to leave it alone. */
  async mutateSnapshot(
    exportId: string,
    generatedTime: string,
    change: (row: SnapshotRow) => Partial<SnapshotRow> | undefined,
  ): Promise<SnapshotRow | undefined> {
    const result = (await this.snapshots.mutate(exportId, generatedTime, change))?.value;
    if (result?.status === 'superseded') this.remember(exportId, generatedTime, result, Date.now());
    return result;
  }

  getPart(exportId: string, snapshotId: string, path: string): Promise<Versioned<PartRow> | undefined> {
    return this.parts.get(partsPartitionKey(exportId, snapshotId), encodeKey(path));
  }

  listParts(exportId: string, snapshotId: string): Promise<Versioned<PartRow>[]> {
    return this.parts.list(partsPartitionKey(exportId, snapshotId));
  }

  /** Insert part rows (of one snapshot) that do not exist yet, 100 to a transaction. */
  insertParts(rows: readonly PartRow[]): Promise<void> {
    return this.parts.insertMany(rows);
  }

  updatePart(current: Versioned<PartRow>, changes: Partial<PartRow>): Promise<void> {
    return this.parts.update(current, changes);
  }

  /**
   * Forget a paged read that found nothing (its rows, not its blobs): the part rows first, the snapshot row last and
   * under its ETag, so a crash in between leaves a read the next tick finds and forgets again.
   */
  async forgetRead(snapshot: Versioned<SnapshotRow>): Promise<void> {
    for (const part of await this.listParts(snapshot.value.exportId, snapshot.value.snapshotId)) {
      await this.parts.remove(part);
    }
    await this.snapshots.remove(snapshot);
  }

  /**
   * Where a snapshot's parts stand, from the rows that are not landed yet, without reading the landed ones:
   * `in-flight` as soon as one is queued (usually the first row read), `all-landed` when none is left,
   * `stuck` when the rest are expired or failed (`failed` says whether any failed for good).
   */
  async partProgress(
    exportId: string,
    snapshotId: string,
  ): Promise<{ state: 'in-flight' } | { state: 'all-landed' } | { state: 'stuck'; failed: boolean }> {
    const partitionKey = partsPartitionKey(exportId, snapshotId);
    // While a snapshot copies, the answer is "one is still queued": asked for one row, so the response is one row,
    // not a page of a thousand.
    for await (const _queued of this.parts.project(partitionKey, odata`status eq ${'queued'}`, ['status'], {
      pageSize: 1,
    })) {
      return { state: 'in-flight' };
    }
    let failed = false;
    let remaining = 0;
    for await (const row of this.parts.project(partitionKey, odata`status ne ${'landed'}`, ['status'])) {
      if (row.status === 'queued') return { state: 'in-flight' };
      remaining++;
      if (row.status === 'failed') failed = true;
    }
    return remaining === 0 ? { state: 'all-landed' } : { state: 'stuck', failed };
  }

  /**
   * Record that these parts' messages are on the queue: their SAS expiry, which tells the next tick the part is
   * in flight (tickPlan.needsAnotherMessage). Written in transactions after the messages are sent, never before.
   */
  markInFlight(exportId: string, snapshotId: string, parts: readonly { path: string; sasExpiresOn: string }[]) {
    return this.parts.mergeMany(
      partsPartitionKey(exportId, snapshotId),
      parts.map((p) => ({ rowKey: encodeKey(p.path), properties: { sasExpiresOn: p.sasExpiresOn } })),
    );
  }

  /** Like mutateSnapshot, for a part row. Returns the row as written, or undefined if left alone. */
  async mutatePart(
    exportId: string,
    snapshotId: string,
    path: string,
    change: (row: PartRow) => Partial<PartRow> | undefined,
  ): Promise<PartRow | undefined> {
    const result = await this.parts.mutate(partsPartitionKey(exportId, snapshotId), encodeKey(path), change);
    return result?.changed ? result.value : undefined;
  }
}
