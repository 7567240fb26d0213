import { finished } from 'node:stream/promises';
import type { BlobItem } from '@azure/storage-blob';
import { ByteWriter, type ColumnSource, ParquetWriter, schemaFromColumnData } from 'hyparquet-writer';
import { BlockUploadSink } from '../core/blockUpload.js';
import type { LandedExportId } from '../core/catalog.js';
import { contractProblems, manifestSchema, parseJson, type SnapshotManifest } from '../core/contracts.js';
import { classifyStorageError, isStorageCondition, MdvmError } from '../core/errors.js';
import { manifestPath } from '../core/parts.js';
import type { Runtime } from '../core/runtime.js';
import { streamToString } from '../core/storage.js';
import type { Telemetry } from '../core/telemetry.js';
import {
  type CuratedManifest,
  curatedFolder,
  curatedManifestPath,
  curatedManifestSchema,
  curatedPartPath,
  sourceDigest,
} from './contracts.js';
import { listedUnlessGap } from './listingWalk.js';
import { recordNormaliser, type TypedRow } from './normalise.js';
import { readRawRecords } from './rawParts.js';
import { ADDITIONAL_PROPERTIES, type ColumnType, type RecordSchema, recordSchema } from './schemas.js';

/**
 * One raw part to one Parquet file: the landed gzip JSON Lines are read back (length and MD5 checked against the raw
 * manifest, so the curated copy is of exactly the bytes the manifest promises), every line is normalised to its
 * export's columns and written in row groups through a pure-JS Parquet writer (ADR 0011) into staged blocks. Memory
 * holds one row group of rows and one of encoded bytes, whatever the part's size. The blob is committed create-only,
 * with its row count and what it was made from (`sourceIdentity`) in its metadata; a duplicate delivery finds it and
 * stops.
 */
export const ROW_GROUP_ROWS = 5000;
/**
 * A row group is also cut when its rows' raw JSON reaches this: held as typed rows and then as encoded columns, a
 * group of 5,000 records of 60 KiB each took the process to 801 MiB, where 5,000 of 1 KiB took 178 MiB.
 */
export const ROW_GROUP_RAW_BYTES = 16 * 1024 * 1024;

/** Whether a row group holding `rows` rows made from `rawBytes` bytes of JSON is written out now. */
export function rowGroupFull(rows: number, rawBytes: number): boolean {
  return rows >= ROW_GROUP_ROWS || rawBytes >= ROW_GROUP_RAW_BYTES;
}

const BLOCK_BYTES = 4 * 1024 * 1024;
const PARQUET_TYPES: Record<ColumnType, NonNullable<ColumnSource['type']>> = {
  string: 'STRING',
  long: 'INT64',
  real: 'DOUBLE',
  bool: 'BOOLEAN',
  datetime: 'TIMESTAMP',
  dynamic: 'JSON',
};

export function parquetColumns(schema: RecordSchema): { name: string; type: NonNullable<ColumnSource['type']> }[] {
  return [
    ...schema.columns.map((c) => ({ name: c.name, type: PARQUET_TYPES[c.type] })),
    { name: ADDITIONAL_PROPERTIES, type: 'JSON' as const },
  ];
}

export interface CuratePartResult {
  readonly path: string;
  readonly rows: number;
  readonly bytes: number;
  /** `duplicate`: an earlier delivery already wrote it. */
  readonly outcome: 'landed' | 'duplicate';
}

/** The raw manifest of a snapshot, read and checked: derived data is only ever made from a complete snapshot. */
export async function readRawManifest(
  runtime: Runtime,
  exportId: string,
  snapshotId: string,
): Promise<SnapshotManifest> {
  const path = manifestPath(exportId, snapshotId);
  const text = await downloadText(runtime, path).catch((error: unknown) => {
    if (isStorageCondition(error, 'not-found')) {
      throw new MdvmError('fatal', `${path} does not exist: ${exportId}/${snapshotId} is not a complete snapshot`);
    }
    throw classifyStorageError(error, `read ${path}`);
  });
  const parsed = manifestSchema.safeParse(parseJson(text));
  if (!parsed.success) throw new MdvmError('fatal', `${path} breaks its contract: ${contractProblems(parsed.error)}`);
  if (parsed.data.export !== exportId || parsed.data.snapshot !== snapshotId) {
    throw new MdvmError('fatal', `${path} names ${parsed.data.export}/${parsed.data.snapshot}`);
  }
  return parsed.data;
}

export async function curatePart(
  runtime: Runtime,
  telemetry: Telemetry,
  manifest: SnapshotManifest,
  rawPath: string,
  options: { abortSignal?: AbortSignal } = {},
): Promise<CuratePartResult> {
  const started = Date.now();
  const part = manifest.parts.find((p) => p.path === rawPath);
  if (!part) {
    throw new MdvmError(
      'invalid-input',
      `${rawPath} is not a part of ${manifest.export}/${manifest.snapshot}'s manifest`,
    );
  }
  const schema = recordSchema(manifest.export as LandedExportId);
  if (!schema) throw new MdvmError('invalid-input', `no record schema for export ${manifest.export}`);
  const target = curatedPartPath(part.path);
  const dest = runtime.landing.getBlockBlobClient(target);
  const existing = await curatedPartOf(runtime, target);
  if (existing) {
    if (existing.source !== sourceIdentity(part)) {
      throw new MdvmError('fatal', `${target} exists but was made from other bytes than ${part.path}`);
    }
    return { path: target, rows: existing.rows, bytes: existing.bytes, outcome: 'duplicate' };
  }

  const sink = new BlockUploadSink(dest, { blockBytes: BLOCK_BYTES, blocks: 2, abortSignal: options.abortSignal });
  // Written to directly, not through a pipeline: its failures arrive through the write callbacks and `finished`. An
  // 'error' event without a listener would be an uncaught exception that takes the whole worker down.
  sink.on('error', () => undefined);
  const writer = new SinkWriter(sink);
  const columns = parquetColumns(schema);
  const parquet = new ParquetWriter({
    writer,
    schema: schemaFromColumnData({ columnData: columns.map((c) => ({ ...c, data: [] })) }),
    createdBy: 'mdvm-ingest',
    kvMetadata: [
      { key: 'mdvm.export', value: manifest.export },
      { key: 'mdvm.snapshot', value: manifest.snapshot },
      { key: 'mdvm.source', value: part.path },
    ],
  });
  const normaliser = recordNormaliser(schema);
  let rows = 0;
  let batch: TypedRow[] = [];
  let batchRawBytes = 0;
  const flushBatch = async () => {
    if (batch.length === 0) return;
    const columnData = columns.map((c) => ({
      ...c,
      data: batch.map((row) => toParquetValue(c.type, row[c.name])),
    }));
    batch = [];
    batchRawBytes = 0;
    await parquet.write({ columnData, rowGroupSize: ROW_GROUP_ROWS });
  };
  try {
    // readRawRecords also checks the line count against the manifest's records before it ends.
    for await (const { record, lineBytes } of readRawRecords(runtime, part, options)) {
      batch.push(normaliser.normalise(record));
      batchRawBytes += lineBytes;
      rows++;
      if (rowGroupFull(batch.length, batchRawBytes)) await flushBatch();
    }
    await flushBatch();
    await parquet.finish();
  } catch (error) {
    sink.destroy();
    throw error instanceof MdvmError ? error : classifyStorageError(error, `write ${target}`);
  }
  sink.end();
  await finished(sink);
  try {
    const { bytes } = await sink.commit({
      contentType: 'application/vnd.apache.parquet',
      metadata: { rows: String(rows), source: sourceIdentity(part) },
      conditions: { ifNoneMatch: '*' },
    });
    telemetry.track('derived', {
      export: manifest.export,
      snapshot: manifest.snapshot,
      part: part.part,
      bytes,
      records: rows,
      durationMs: Date.now() - started,
      method: 'curated',
      outcome: 'landed',
    });
    return { path: target, rows, bytes, outcome: 'landed' };
  } catch (error) {
    if (isStorageCondition(error, 'precondition-failed', 'already-exists', 'conflict')) {
      // Another delivery committed first: the same bytes in, the same rows out.
      const other = await curatedPartOf(runtime, target);
      if (other?.source === sourceIdentity(part))
        return { path: target, rows: other.rows, bytes: other.bytes, outcome: 'duplicate' };
    }
    throw error instanceof MdvmError ? error : classifyStorageError(error, `commit ${target}`);
  }
}

/** What a curated part was made from: the raw part's MD5 when the manifest has one, else its length. */
function sourceIdentity(part: SnapshotManifest['parts'][number]): string {
  return part.md5 ? `md5:${part.md5}` : `bytes:${part.bytes}`;
}

async function curatedPartOf(
  runtime: Runtime,
  path: string,
): Promise<{ rows: number; bytes: number; source: string } | undefined> {
  try {
    const props = await runtime.landing.getBlobClient(path).getProperties();
    return {
      rows: Number(props.metadata?.rows ?? Number.NaN),
      bytes: props.contentLength ?? 0,
      source: props.metadata?.source ?? '',
    };
  } catch (error) {
    if (isStorageCondition(error, 'not-found')) return undefined;
    throw classifyStorageError(error, `read ${path}`);
  }
}

/**
 * When every part of the raw manifest has its curated file, write the curated `_manifest.json` (create-only). One
 * listing with metadata; safe to call after every part, concurrently, and again after a crash.
 */
interface CuratedBlob {
  readonly rows: number;
  readonly bytes: number;
  readonly source: string;
  readonly md5: string;
}

/** Names listed a page at a time: small enough that a delivery which is not the last stops after one request. */
const CURATED_LISTING_PAGE = 1_000;

/**
 * The curated blobs of a snapshot's parts, or undefined as soon as one is missing. Every delivery asks, and most
 * are not the last: the listing is walked beside the expected names and stops at the first gap, so a snapshot of N
 * parts does not list N curated blobs N times.
 */
async function curatedPartsIfAll(
  runtime: Runtime,
  manifest: SnapshotManifest,
): Promise<Map<string, CuratedBlob> | undefined> {
  const pages = (async function* () {
    for await (const page of runtime.landing
      .listBlobsFlat({ prefix: `${curatedFolder(manifest.export, manifest.snapshot)}/`, includeMetadata: true })
      .byPage({ maxPageSize: CURATED_LISTING_PAGE })) {
      yield page.segment.blobItems;
    }
  })();
  const listed = await listedUnlessGap(
    manifest.parts.map((p) => curatedPartPath(p.path)),
    pages,
  );
  if (listed === 'gap') return undefined;
  if (listed === 'unordered') return allCuratedParts(runtime, manifest);
  return new Map([...listed].map(([name, blob]) => [name, curatedBlobOf(blob)]));
}

async function allCuratedParts(runtime: Runtime, manifest: SnapshotManifest): Promise<Map<string, CuratedBlob>> {
  const found = new Map<string, CuratedBlob>();
  for await (const blob of runtime.landing.listBlobsFlat({
    prefix: `${curatedFolder(manifest.export, manifest.snapshot)}/`,
    includeMetadata: true,
  })) {
    found.set(blob.name, curatedBlobOf(blob));
  }
  return found;
}

function curatedBlobOf(blob: BlobItem): CuratedBlob {
  return {
    rows: Number(blob.metadata?.rows ?? Number.NaN),
    bytes: blob.properties.contentLength ?? 0,
    source: blob.metadata?.source ?? '',
    md5: blob.properties.contentMD5 ? Buffer.from(blob.properties.contentMD5).toString('base64') : '',
  };
}

export async function completeCuratedIfReady(
  runtime: Runtime,
  telemetry: Telemetry,
  manifest: SnapshotManifest,
): Promise<CuratedManifest | undefined> {
  const found = await curatedPartsIfAll(runtime, manifest);
  if (!found) return undefined;
  const parts: CuratedManifest['parts'] = [];
  for (const raw of manifest.parts) {
    const path = curatedPartPath(raw.path);
    const curated = found.get(path);
    if (!curated || curated.source !== sourceIdentity(raw) || !Number.isSafeInteger(curated.rows)) return undefined;
    parts.push({ path, source: raw.path, rows: curated.rows, bytes: curated.bytes, md5: curated.md5 || 'unknown' });
  }
  const schema = recordSchema(manifest.export as LandedExportId);
  const curated: CuratedManifest = {
    v: 1,
    kind: 'curated',
    export: manifest.export,
    snapshot: manifest.snapshot,
    generatedTime: manifest.generatedTime,
    completedAt: runtime.now().toISOString(),
    source: manifestPath(manifest.export, manifest.snapshot),
    sourceDigest: sourceDigest(manifest.parts),
    format: 'parquet',
    columns: [
      ...schema.columns.map((c) => ({ name: c.name, type: c.type })),
      { name: ADDITIONAL_PROPERTIES, type: 'dynamic' },
    ],
    totals: {
      parts: parts.length,
      rows: parts.reduce((s, p) => s + p.rows, 0),
      bytes: parts.reduce((s, p) => s + p.bytes, 0),
    },
    parts,
  };
  const checked = curatedManifestSchema.safeParse(curated);
  if (!checked.success) {
    throw new MdvmError('fatal', `refusing to write the curated manifest: ${contractProblems(checked.error)}`);
  }
  const written = await writeDerivedManifest(
    runtime,
    curatedManifestPath(manifest.export, manifest.snapshot),
    curated,
    {
      identity: (m) => (m as { sourceDigest?: string } | undefined)?.sourceDigest,
      stillCurrent: async () =>
        (await currentRawDigest(runtime, manifest.export, manifest.snapshot)) === curated.sourceDigest,
    },
  );
  if (written) {
    telemetry.track('derived', {
      export: manifest.export,
      snapshot: manifest.snapshot,
      bytes: curated.totals.bytes,
      records: curated.totals.rows,
      method: 'curated',
      outcome: 'completed',
    });
  }
  return curated;
}

/**
 * A derived `_manifest.json`, create-only. One already there with the same identity (made from the same inputs) is
 * another delivery's identical result: false. One with another identity is stale (the raw manifest was replaced with
 * more parts, or the previous snapshot changed) and is replaced under its ETag: true. Before every write the inputs are
 * checked again (`stillCurrent`): a slow delivery that started from an older raw manifest never puts its result back
 * over a newer one's.
 */
export async function writeDerivedManifest(
  runtime: Runtime,
  path: string,
  value: object,
  options: { identity: (manifest: unknown) => string | undefined; stillCurrent: () => Promise<boolean> },
): Promise<boolean> {
  const body = `${JSON.stringify(value, null, 2)}\n`;
  const own = options.identity(value);
  const blob = runtime.landing.getBlockBlobClient(path);
  for (let attempt = 0; attempt < 5; attempt++) {
    if (!(await options.stillCurrent())) return false;
    let conditions: { ifNoneMatch: string } | { ifMatch: string } = { ifNoneMatch: '*' };
    if (attempt > 0) {
      const existing = await blob.download().catch((error: unknown) => {
        if (isStorageCondition(error, 'not-found')) return undefined;
        throw classifyStorageError(error, `read ${path}`);
      });
      if (existing?.etag) {
        const text = existing.readableStreamBody ? await streamToString(existing.readableStreamBody) : '';
        if (options.identity(parseJson(text)) === own) return false;
        conditions = { ifMatch: existing.etag };
      }
    }
    try {
      await blob.upload(body, Buffer.byteLength(body), {
        blobHTTPHeaders: { blobContentType: 'application/json; charset=utf-8' },
        conditions,
      });
      return true;
    } catch (error) {
      if (!isStorageCondition(error, 'already-exists', 'precondition-failed', 'conflict')) {
        throw classifyStorageError(error, `write ${path}`);
      }
    }
  }
  throw new MdvmError('transient', `${path} kept changing under us`);
}

/** The digest of the raw manifest now in place (undefined when it is gone or unreadable). */
export async function currentRawDigest(
  runtime: Runtime,
  exportId: string,
  snapshotId: string,
): Promise<string | undefined> {
  try {
    return sourceDigest((await readRawManifest(runtime, exportId, snapshotId)).parts);
  } catch (error) {
    if (error instanceof MdvmError && error.kind === 'fatal') return undefined;
    throw error;
  }
}

export async function downloadText(runtime: Runtime, path: string): Promise<string> {
  const buffer = await runtime.landing.getBlobClient(path).downloadToBuffer();
  return buffer.toString('utf8');
}

function toParquetValue(type: NonNullable<ColumnSource['type']>, value: unknown): unknown {
  if (value === null || value === undefined) return null;
  if (type === 'INT64') return BigInt(value as number);
  return value;
}

/**
 * hyparquet-writer's Writer, flushed into a block sink after every row group: `offset` keeps counting the whole file
 * (the footer's column offsets need it) while the buffer is emptied.
 */
class SinkWriter extends ByteWriter {
  constructor(private readonly sink: BlockUploadSink) {
    super(1024 * 1024);
  }
  flush(): Promise<void> {
    const chunk = Buffer.from(this.getBytes());
    this.index = 0;
    return new Promise((resolve, reject) => {
      this.sink.write(chunk, (error) => (error ? reject(error) : resolve()));
    });
  }
  override finish(): Promise<void> {
    return this.flush();
  }
}
