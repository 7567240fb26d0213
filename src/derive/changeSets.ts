import { createHash } from 'node:crypto';
import { Transform, type TransformCallback } from 'node:stream';
import { finished, pipeline } from 'node:stream/promises';
import { createGzip } from 'node:zlib';
import type { BlockBlobClient } from '@azure/storage-blob';
import { BlockUploadSink } from '../core/blockUpload.js';
import type { LandedExportId } from '../core/catalog.js';
import { contractProblems, manifestSchema, parseJson, type SnapshotManifest } from '../core/contracts.js';
import { classifyStorageError, isStorageCondition, MdvmError } from '../core/errors.js';
import { compareGeneratedTime, manifestPath as rawManifestPath } from '../core/parts.js';
import type { Runtime } from '../core/runtime.js';
import type { Telemetry } from '../core/telemetry.js';
import {
  type ChangeKind,
  type ChangeSetManifest,
  changeSetManifestSchema,
  changesDataPath,
  changesManifestPath,
  sourceDigest,
} from './contracts.js';
import { currentRawDigest, downloadText, writeDerivedManifest } from './curate.js';
import { recordNormaliser, type TypedRow } from './normalise.js';
import { readRawRecords } from './rawParts.js';
import { hasChangeSets, type RecordSchema, recordSchema } from './schemas.js';

/**
 * What appeared, disappeared or changed per device between two consecutive complete snapshots of one export type,
 * by the type's documented key (schemas.ts). Three streaming passes keep memory to one short entry per distinct key
 * of the previous snapshot (a 16-byte key hash and, when the type tracks columns, their values) and one per key the
 * current snapshot adds (the hash alone), never whole records:
 * 1. the previous snapshot: key hash → tracked values (and expiry);
 * 2. the current one: `added` when the key is new (and an entry for it, so a repeat is a duplicate), `changed` when a
 *    tracked column differs, `expired` when its expiry date passed between the two snapshots; every key seen is
 *    marked;
 * 3. the previous one again: `removed` for every key not seen.
 * Rows are gzip JSON Lines: `{Change, DeviceId, Key, Changed?, Record}`, Record being the normalised row (the new one,
 * or the old one for `removed`).
 */
export interface ChangeRow {
  Change: ChangeKind;
  DeviceId: unknown;
  Key: Record<string, unknown>;
  Changed?: Record<string, { from: unknown; to: unknown }>;
  Record: TypedRow;
}

interface PreviousEntry {
  tracked: string;
  expiresAtMs: number | null;
  seen: boolean;
}

export async function buildChangeSet(
  runtime: Runtime,
  telemetry: Telemetry,
  manifest: SnapshotManifest,
  options: { abortSignal?: AbortSignal } = {},
): Promise<ChangeSetManifest & { outcome: 'landed' | 'duplicate' | 'superseded' }> {
  const started = Date.now();
  const exportId = manifest.export as LandedExportId;
  if (!hasChangeSets(exportId)) {
    throw new MdvmError('invalid-input', `${exportId} is a change list already; it has no change sets`);
  }
  const manifestPath = changesManifestPath(manifest.export, manifest.snapshot);
  const digest = sourceDigest(manifest.parts);
  const previous = await previousCompleteSnapshot(runtime, manifest);
  const previousRef = previous
    ? {
        snapshot: previous.manifest.snapshot,
        generatedTime: previous.manifest.generatedTime,
        manifest: previous.path,
        sourceDigest: sourceDigest(previous.manifest.parts),
      }
    : null;
  const identity = changeSetIdentity({ sourceDigest: digest, previous: previousRef });
  const existing = await readChangeSetManifest(runtime, manifestPath);
  // The same inputs (this raw part list, the same previous snapshot) and its data file as listed: done. Anything else
  // (the raw manifest replaced with more parts, a previous snapshot that completed since) is built again.
  if (existing && changeSetIdentity(existing) === identity && (await dataAsListed(runtime, existing))) {
    return { ...existing, outcome: 'duplicate' };
  }

  const schema = recordSchema(exportId);
  const normaliser = recordNormaliser(schema);
  const keyOf = (row: TypedRow) =>
    createHash('md5')
      .update(JSON.stringify(schema.keyColumns.map((c) => row[c])))
      .digest('base64');
  const trackedOf = (row: TypedRow) =>
    schema.trackedColumns.length ? JSON.stringify(schema.trackedColumns.map((c) => row[c])) : '';
  const expiryOf = (row: TypedRow) => {
    const value = schema.expiryColumn ? row[schema.expiryColumn] : null;
    return value instanceof Date ? value.getTime() : null;
  };
  const before = new Map<string, PreviousEntry>();
  let duplicateKeys = 0;
  if (previous) {
    await forEachRecord(runtime, previous.manifest, normaliser.normalise, options, (row) => {
      const key = keyOf(row);
      if (before.has(key)) duplicateKeys++;
      else before.set(key, { tracked: trackedOf(row), expiresAtMs: expiryOf(row), seen: false });
    });
  }

  // One data file per set of inputs: a build from other inputs never overwrites the file a manifest names.
  const dataPath = changesDataPath(manifest.export, manifest.snapshot, identity);
  const out = new ChangeWriter(runtime, dataPath, options.abortSignal);
  const totals = { added: 0, removed: 0, changed: 0, expired: 0 };
  const devices = new Set<string>();
  const emit = async (change: ChangeKind, row: TypedRow, changed?: ChangeRow['Changed']) => {
    totals[change]++;
    devices.add(String(row.DeviceId));
    await out.write({
      Change: change,
      DeviceId: row.DeviceId,
      Key: Object.fromEntries(schema.keyColumns.map((c) => [c, row[c]])),
      ...(changed ? { Changed: changed } : {}),
      Record: row,
    });
  };
  const nowMs = Date.parse(manifest.generatedTime);
  const thenMs = previous ? Date.parse(previous.manifest.generatedTime) : nowMs;
  try {
    if (previous) {
      await forEachRecord(runtime, manifest, normaliser.normalise, options, async (row) => {
        const key = keyOf(row);
        const old = before.get(key);
        if (!old) {
          // Marked as seen, so a repeat of a new key is a duplicate and pass 3 never calls it removed.
          before.set(key, { tracked: '', expiresAtMs: null, seen: true });
          return emit('added', row);
        }
        if (old.seen) {
          duplicateKeys++;
          return;
        }
        old.seen = true;
        const tracked = trackedOf(row);
        if (tracked !== old.tracked) return emit('changed', row, trackedChanges(schema, old.tracked, row));
        const expires = expiryOf(row);
        if (expires !== null && expires <= nowMs && expires > thenMs) return emit('expired', row);
      });
      await forEachRecord(runtime, previous.manifest, normaliser.normalise, options, async (row) => {
        const entry = before.get(keyOf(row));
        if (entry && !entry.seen) {
          entry.seen = true;
          await emit('removed', row);
        }
      });
    }
    const { bytes, md5 } = await out.close();
    const changeSet: ChangeSetManifest = {
      v: 1,
      kind: 'changes',
      export: manifest.export,
      snapshot: manifest.snapshot,
      generatedTime: manifest.generatedTime,
      completedAt: runtime.now().toISOString(),
      source: rawManifestPath(manifest.export, manifest.snapshot),
      sourceDigest: digest,
      previous: previousRef,
      keyColumns: [...schema.keyColumns],
      trackedColumns: [...schema.trackedColumns],
      totals: {
        ...totals,
        rows: totals.added + totals.removed + totals.changed + totals.expired,
        devices: devices.size,
        duplicateKeys,
      },
      path: dataPath,
      bytes,
      md5,
    };
    const checked = changeSetManifestSchema.safeParse(changeSet);
    if (!checked.success)
      throw new MdvmError('fatal', `refusing to write the change set manifest: ${contractProblems(checked.error)}`);
    const written = await writeDerivedManifest(runtime, manifestPath, changeSet, {
      identity: (m) =>
        changeSetManifestSchema.safeParse(m).success ? changeSetIdentity(m as ChangeSetManifest) : undefined,
      stillCurrent: async () => {
        if ((await currentRawDigest(runtime, manifest.export, manifest.snapshot)) !== digest) return false;
        const now = await previousCompleteSnapshot(runtime, manifest);
        return (
          (now?.manifest.snapshot ?? null) === (previousRef?.snapshot ?? null) &&
          (now ? sourceDigest(now.manifest.parts) : null) === (previousRef?.sourceDigest ?? null)
        );
      },
    });
    if (!written) {
      // Another delivery wrote the same, or this one's inputs changed while it ran (the message of the newer inputs
      // builds it).
      const other = await readChangeSetManifest(runtime, manifestPath);
      return other && changeSetIdentity(other) === identity
        ? { ...other, outcome: 'duplicate' }
        : { ...changeSet, outcome: 'superseded' };
    }
    telemetry.track('derived', {
      export: manifest.export,
      snapshot: manifest.snapshot,
      bytes,
      records: changeSet.totals.rows,
      durationMs: Date.now() - started,
      method: 'changes',
      outcome: 'completed',
    });
    return { ...changeSet, outcome: 'landed' };
  } catch (error) {
    out.abort();
    throw error;
  }
}

/** What a change set was made from: this raw part list and the previous snapshot's. */
function changeSetIdentity(m: {
  sourceDigest: string;
  previous: { snapshot: string; sourceDigest: string } | null;
}): string {
  return `${m.sourceDigest}|${m.previous?.snapshot ?? '-'}|${m.previous?.sourceDigest ?? '-'}`;
}

async function dataAsListed(runtime: Runtime, m: ChangeSetManifest): Promise<boolean> {
  try {
    const props = await runtime.landing.getBlobClient(m.path).getProperties();
    const md5 = props.contentMD5 ? Buffer.from(props.contentMD5).toString('base64') : undefined;
    return props.contentLength === m.bytes && (md5 === undefined || md5 === m.md5);
  } catch (error) {
    if (isStorageCondition(error, 'not-found')) return false;
    throw classifyStorageError(error, `read ${m.path}`);
  }
}

function trackedChanges(schema: RecordSchema, oldTracked: string, row: TypedRow): ChangeRow['Changed'] {
  const old = JSON.parse(oldTracked) as unknown[];
  const changed: NonNullable<ChangeRow['Changed']> = {};
  schema.trackedColumns.forEach((column, i) => {
    const from = old[i];
    const to = JSON.parse(JSON.stringify(row[column] ?? null)) as unknown;
    if (JSON.stringify(from) !== JSON.stringify(to)) changed[column] = { from, to };
  });
  return changed;
}

async function readChangeSetManifest(runtime: Runtime, path: string): Promise<ChangeSetManifest | undefined> {
  let text: string;
  try {
    text = await downloadText(runtime, path);
  } catch (error) {
    if (isStorageCondition(error, 'not-found')) return undefined;
    throw classifyStorageError(error, `read ${path}`);
  }
  const parsed = changeSetManifestSchema.safeParse(parseJson(text));
  if (!parsed.success) throw new MdvmError('fatal', `${path} breaks its contract: ${contractProblems(parsed.error)}`);
  return parsed.data;
}

/**
 * The newest snapshot older than this one whose raw `_manifest.json` exists (by the contract, that is what complete
 * means; a row's status can lag behind it, e.g. while a snapshot whose file list grew is copied again). Snapshots whose
 * manifest is gone (deleted by retention) are skipped; the change set says which one it compared against.
 */
async function previousCompleteSnapshot(
  runtime: Runtime,
  manifest: SnapshotManifest,
): Promise<{ manifest: SnapshotManifest; path: string } | undefined> {
  const rows = (await runtime.store.listSnapshots(manifest.export))
    .map((r) => r.value)
    .filter((r) => compareGeneratedTime(r.generatedTime, manifest.generatedTime) < 0)
    .sort((a, b) => compareGeneratedTime(b.generatedTime, a.generatedTime));
  for (const row of rows) {
    const path = rawManifestPath(manifest.export, row.snapshotId);
    let text: string;
    try {
      text = await downloadText(runtime, path);
    } catch (error) {
      if (isStorageCondition(error, 'not-found')) continue;
      throw classifyStorageError(error, `read ${path}`);
    }
    const parsed = manifestSchema.safeParse(parseJson(text));
    if (!parsed.success) throw new MdvmError('fatal', `${path} breaks its contract: ${contractProblems(parsed.error)}`);
    return { manifest: parsed.data, path };
  }
  return undefined;
}

/**
 * The snapshot after this one that already completed: its change set was compared against an older snapshot than
 * this one (this one completed late, or again after its file list grew), so it is built again.
 */
export async function nextCompleteSnapshot(runtime: Runtime, manifest: SnapshotManifest): Promise<string | undefined> {
  const newer = (await runtime.store.listSnapshots(manifest.export))
    .map((r) => r.value)
    .filter((r) => r.status === 'complete' && compareGeneratedTime(r.generatedTime, manifest.generatedTime) > 0)
    .sort((a, b) => compareGeneratedTime(a.generatedTime, b.generatedTime));
  return newer[0]?.snapshotId;
}

/** Every record of a snapshot, normalised, part by part; each part's bytes checked against its manifest entry. */
export async function forEachRecord(
  runtime: Runtime,
  manifest: SnapshotManifest,
  normalise: (record: Record<string, unknown>) => TypedRow,
  options: { abortSignal?: AbortSignal },
  visit: (row: TypedRow) => void | Promise<void>,
): Promise<void> {
  for (const part of manifest.parts) {
    for await (const { record } of readRawRecords(runtime, part, options)) await visit(normalise(record));
  }
}

/**
 * Change rows as gzip JSON Lines into staged blocks, committed create-only on close. The same inputs always give the
 * same bytes, and two deliveries of one message can run at once (on two instances): the one that commits second finds
 * the blob there (or its blocks dropped by the first commit: InvalidBlockList) and, when the blob has its length and
 * MD5, goes on as if it had written it. Block ids are unique per attempt (BlockUploadSink), so two deliveries' blocks
 * never end up in one blob.
 */
export class ChangeWriter {
  private readonly gzip = createGzip();
  private readonly hash = createHash('md5');
  private readonly blob: BlockBlobClient;
  private readonly sink: BlockUploadSink;
  private readonly done: Promise<void>;
  constructor(runtime: Runtime, path: string, abortSignal?: AbortSignal) {
    this.blob = runtime.landing.getBlockBlobClient(path);
    this.sink = new BlockUploadSink(this.blob, {
      blockBytes: 4 * 1024 * 1024,
      blocks: 2,
      ...(abortSignal ? { abortSignal } : {}),
    });
    // Our own MD5 of the bytes, for comparing with a blob another delivery committed first (the sink gives its MD5
    // only from a commit that succeeded).
    const hash = this.hash;
    const md5Tap = new Transform({
      transform(chunk: Buffer, _encoding, callback: TransformCallback) {
        hash.update(chunk);
        callback(null, chunk);
      },
    });
    this.done = pipeline(this.gzip, md5Tap, this.sink);
    this.done.catch(() => undefined);
  }
  async write(row: ChangeRow): Promise<void> {
    // A failed upload destroys the gzip stream through the pipeline: say so instead of waiting for a 'drain' that
    // never comes.
    if (this.gzip.destroyed) await this.done;
    if (this.gzip.destroyed) throw new MdvmError('transient', 'the change set upload stopped');
    if (!this.gzip.write(`${JSON.stringify(row)}\n`)) {
      await Promise.race([
        new Promise<void>((resolve) => this.gzip.once('drain', resolve)),
        this.done.then(() => {
          throw new MdvmError('transient', 'the change set upload ended early');
        }),
      ]);
    }
  }
  async close(): Promise<{ bytes: number; md5: string }> {
    this.gzip.end();
    await this.done;
    await finished(this.sink).catch(() => undefined);
    try {
      return await this.sink.commit({ contentType: 'application/x-ndjson', conditions: { ifNoneMatch: '*' } });
    } catch (error) {
      if (!lostTheCommitRace(error)) {
        throw error instanceof MdvmError ? error : classifyStorageError(error, 'commit the change set');
      }
      return this.sameBlobAlreadyThere({ bytes: this.sink.bytes, md5: this.hash.digest('base64') });
    }
  }
  abort(): void {
    this.gzip.destroy();
  }

  /** Another delivery committed first: its blob must be ours byte for byte, else this one tries again later. */
  private async sameBlobAlreadyThere(ours: { bytes: number; md5: string }): Promise<{ bytes: number; md5: string }> {
    const props = await this.blob.getProperties().catch((error: unknown) => {
      if (isStorageCondition(error, 'not-found')) {
        throw new MdvmError('transient', `${this.blob.name}: the commit lost a race, but no blob is there`, {
          cause: error,
        });
      }
      throw classifyStorageError(error, `read ${this.blob.name}`);
    });
    const md5 = props.contentMD5 ? Buffer.from(props.contentMD5).toString('base64') : undefined;
    if (props.contentLength === ours.bytes && md5 === ours.md5) return ours;
    throw new MdvmError(
      'transient',
      `${this.blob.name} was committed by another delivery with other bytes (${props.contentLength} bytes, MD5 ${md5 ?? 'none'}; ours ${ours.bytes} bytes, MD5 ${ours.md5})`,
    );
  }
}

/**
 * A create-only commit that found the blob there (409/412), or whose staged blocks were dropped by another commit to
 * the same blob (400 InvalidBlockList, classified fatal by the sink: the cause still has the service's code).
 */
function lostTheCommitRace(error: unknown): boolean {
  if (isStorageCondition(error, 'precondition-failed', 'already-exists', 'conflict')) return true;
  const cause = error instanceof MdvmError ? error.cause : error;
  return (cause as { code?: string } | undefined)?.code === 'InvalidBlockList';
}
