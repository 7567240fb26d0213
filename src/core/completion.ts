import { enqueueDerivations } from '../derive/derive.js';
import { exportTitle } from './catalog.js';
import {
  contractProblems,
  type LatestPointer,
  latestSchema,
  manifestSchema,
  type PartRow,
  parseJson,
  type SnapshotManifest,
  type SnapshotRow,
} from './contracts.js';
import { classifyStorageError, errorMessage, isStorageCondition, MdvmError } from './errors.js';
import { ConcurrentUpdateError, type Versioned } from './manifestStore.js';
import { annotate, inSpan, record, SPAN_NAMES } from './observability.js';
import { compareGeneratedTime, latestPath, manifestPath, snapshotFolder, snapshotIdOf } from './parts.js';
import type { Runtime } from './runtime.js';
import { streamToString } from './storage.js';
import type { Telemetry } from './telemetry.js';

export type { LatestPointer, SnapshotManifest } from './contracts.js';

const JSON_HEADERS = { blobContentType: 'application/json; charset=utf-8' };

/**
 * Completes a snapshot when every part row is landed: writes `_manifest.json` (create-only, so
 * exactly one ever exists), moves `_latest.json` forward (never back), marks the snapshot complete.
 * Safe to call any number of times, concurrently, and after a crash at any step.
 * Returns true when the snapshot is complete.
 *
 * Each attempt decides from one read of the snapshot row and acts only while that row is unchanged: the flip to
 * `complete` is conditional on its ETag, and so is replacing a manifest. A tick that records more parts, a check that
 * reopens a missing blob or another completion meanwhile makes the attempt start again from fresh reads, so a slow
 * completion can neither complete a snapshot over newer state nor put back a manifest that lists fewer parts.
 */
export async function completeSnapshotIfReady(
  runtime: Runtime,
  telemetry: Telemetry,
  exportId: string,
  generatedTime: string,
): Promise<boolean> {
  // Once an attempt has found a landed blob missing, later attempts check the blobs even of a snapshot another
  // instance has meanwhile completed: that completion listed the folder before the blob went.
  const seen = { missingBlobs: false };
  for (let attempt = 1; attempt <= COMPLETION_ATTEMPTS; attempt++) {
    const outcome = await completeFromOneRead(runtime, telemetry, exportId, generatedTime, seen);
    if (outcome !== 'changed-meanwhile') return outcome;
  }
  throw new MdvmError(
    'transient',
    `the snapshot row of ${exportId} ${generatedTime} kept changing during its completion (${COMPLETION_ATTEMPTS} attempts); the next landing or tick completes it`,
  );
}

const COMPLETION_ATTEMPTS = 5;

async function completeFromOneRead(
  runtime: Runtime,
  telemetry: Telemetry,
  exportId: string,
  generatedTime: string,
  seen: { missingBlobs: boolean },
): Promise<boolean | 'changed-meanwhile'> {
  const snapshot = await runtime.store.getSnapshot(exportId, generatedTime);
  if (!snapshot) return false;
  if (snapshot.value.status === 'superseded') return false;
  const complete = snapshot.value.status === 'complete';
  // Only a snapshot copied part by part can copy a part again; a paged read that completed stays complete, and a
  // page missing since is for `mdvm-ingest verify` to find.
  const copiedByParts = (snapshot.value.mode ?? 'files') === 'files';
  if (complete && !(seen.missingBlobs && copiedByParts)) return true;
  const versions = await runtime.store.listParts(exportId, snapshot.value.snapshotId);
  const rows = versions.map((r) => r.value);
  const landed = rows.filter((r) => r.status === 'landed');
  if (complete) {
    const missing = await partsNotInLanding(runtime, exportId, snapshot.value.snapshotId, landed);
    if (missing.length === 0) return true;
    return reopenMissingParts(runtime, telemetry, snapshot, versions, missing);
  }
  // A refused file is part of the snapshot Defender lists but never of its manifest: no completion while there is one.
  const refused = (snapshot.value.partsRefused ?? 0) > 0;
  if (landed.length < snapshot.value.partCount || landed.length < rows.length || refused) {
    await reconcileCounters(runtime, snapshot.value, landed);
    if (landed.length === rows.length && refused) {
      // Every part is in, but Defender listed files the tick refused: say so, do not wait forever. (Not while a tick
      // still writes the rows of parts to come.)
      await runtime.store.mutateSnapshot(exportId, generatedTime, (row) =>
        (row.status === 'copying' || row.status === 'requested') && rowsCoverSnapshot(row, rows.length)
          ? { status: 'failed' }
          : undefined,
      );
    }
    return false;
  }

  // The rows say every part landed; the manifest may only say so if the blobs agree. One listing of the folder.
  const missing = await partsNotInLanding(runtime, exportId, snapshot.value.snapshotId, landed);
  if (missing.length > 0) {
    seen.missingBlobs = true;
    return reopenMissingParts(runtime, telemetry, snapshot, versions, missing);
  }

  const manifest = checkedManifest(buildManifest(snapshot.value, landed, runtime.now()));
  const path = manifestPath(exportId, snapshot.value.snapshotId);
  const manifestBlob = runtime.landing.getBlockBlobClient(path);
  const body = `${JSON.stringify(manifest, null, 2)}\n`;
  const unchangedSinceRead = async () =>
    (await runtime.store.getSnapshot(exportId, generatedTime))?.etag === snapshot.etag;
  // Read again just before the write: what was listed above still describes the snapshot.
  if (!(await unchangedSinceRead())) return 'changed-meanwhile';
  if ((await writeManifest(manifestBlob, manifest, body, unchangedSinceRead)) === 'changed-meanwhile') {
    return 'changed-meanwhile';
  }
  try {
    await advanceLatest(runtime, exportId, snapshot.value, path);
  } catch (error) {
    // The snapshot stays incomplete until the pointer moves: status shows why, run exits non-zero, and every
    // redelivery or later tick tries again.
    const reason = `_latest.json was not moved to this snapshot: ${errorMessage(error)}`;
    await runtime.store.mutateSnapshot(exportId, generatedTime, (row) =>
      row.status === 'complete' ? undefined : { lastError: reason },
    );
    telemetry.track('snapshot', { export: exportId, snapshot: snapshot.value.snapshotId, outcome: 'error', reason });
    throw error;
  }

  // Before the snapshot is marked complete, so a crash here enqueues them again on the next completion attempt.
  await enqueueDerivations(runtime, manifest);

  try {
    await runtime.store.updateSnapshot(snapshot, {
      status: 'complete',
      completedAt: manifest.completedAt,
      manifestPath: path,
      partsLanded: landed.length,
      bytesLanded: manifest.totals.bytes,
      recordsLanded: manifest.totals.records ?? undefined,
      lastError: '',
    });
  } catch (error) {
    if (error instanceof ConcurrentUpdateError) return 'changed-meanwhile';
    throw error;
  }
  record.snapshotLag(exportId, (Date.parse(manifest.completedAt) - Date.parse(generatedTime)) / 1000);
  telemetry.track('snapshot', {
    export: exportId,
    snapshot: snapshot.value.snapshotId,
    bytes: manifest.totals.bytes,
    ...(manifest.totals.records === null ? {} : { records: manifest.totals.records }),
    durationMs: Date.parse(manifest.completedAt) - Date.parse(snapshot.value.requestedAt),
    outcome: 'completed',
  });
  return true;
}

/** Landed rows whose blob is not in the landing container with the recorded length (and MD5, where both have one). */
async function partsNotInLanding(
  runtime: Runtime,
  exportId: string,
  snapshotId: string,
  landed: PartRow[],
): Promise<MissingPart[]> {
  const listed = new Map<string, { length: number | undefined; md5: string | undefined; etag: string | undefined }>();
  try {
    for await (const blob of runtime.landing.listBlobsFlat({ prefix: `${snapshotFolder(exportId, snapshotId)}/` })) {
      const md5 = blob.properties.contentMD5;
      listed.set(blob.name, {
        length: blob.properties.contentLength,
        md5: md5 && md5.length > 0 ? Buffer.from(md5).toString('base64') : undefined,
        etag: blob.properties.etag,
      });
    }
  } catch (error) {
    if (!isStorageCondition(error, 'not-found')) throw classifyStorageError(error, 'list the landed snapshot');
    // The landing container itself is gone: every part is missing.
  }
  const out: MissingPart[] = [];
  for (const row of landed) {
    const blob = listed.get(row.landingPath);
    if (blob?.length === undefined) out.push({ row, problem: 'its landed blob is missing' });
    else if (blob.length !== row.bytes) {
      out.push({
        row,
        problem: `its landed blob has ${blob.length} bytes, not ${row.bytes}`,
        otherBlobEtag: blob.etag,
      });
    } else if (blob.md5 && row.md5 && blob.md5 !== row.md5) {
      out.push({ row, problem: `its landed blob has MD5 ${blob.md5}, not ${row.md5}`, otherBlobEtag: blob.etag });
    }
  }
  return out;
}

/** A landed row whose blob is gone, or is other bytes (`otherBlobEtag`: the version the listing saw). */
interface MissingPart {
  readonly row: PartRow;
  readonly problem: string;
  readonly otherBlobEtag?: string | undefined;
}

/**
 * A part the rows call landed but the landing container does not hold (container deleted, blob deleted or
 * overwritten) is copied again: the snapshot becomes `failed`, other bytes under the part's name are deleted (that
 * version only: a copy never deletes a blob that carries its part's metadata), then the part's row goes back to
 * `failed` with the reason, so the snapshot shows it and the next tick sends it with a fresh URL.
 *
 * Every write is conditional on what this check read. The snapshot row first, If-Match on the read this attempt
 * started from (even a complete one, when an earlier attempt saw the blob missing and another instance completed
 * meanwhile): a completion that listed the folder before the blob went then fails its flip, and a check whose reading
 * is stale (someone reopened, copied again and completed since) starts again instead of failing a good copy. Then the
 * blob, then the part row (If-Match on its read). A crash in between leaves a landed row over a missing blob, which
 * the next check finds again.
 */
async function reopenMissingParts(
  runtime: Runtime,
  telemetry: Telemetry,
  snapshot: Versioned<SnapshotRow>,
  versions: readonly Versioned<PartRow>[],
  missing: MissingPart[],
): Promise<false | 'changed-meanwhile'> {
  const { exportId, snapshotId } = snapshot.value;
  const mode = snapshot.value.mode ?? 'files';
  // What happens next: a part is copied again; a paged read's page is not, its export's next tick reads anew.
  const next =
    mode === 'files'
      ? 'the next tick copies it again'
      : mode === 'json'
        ? 'a paged read cannot copy a page again: the next tick starts a new read'
        : 'a paged read cannot copy a page again: the next window reads the range again';
  try {
    await runtime.store.updateSnapshot(snapshot, {
      status: 'failed',
      lastError: `${missing.length} part(s) recorded as landed are not in the landing container; ${next}`,
    });
  } catch (error) {
    if (error instanceof ConcurrentUpdateError) return 'changed-meanwhile';
    throw error;
  }
  const byPath = new Map(versions.map((v) => [v.value.path, v]));
  for (const { row, problem, otherBlobEtag } of missing) {
    // Only for a copy part by part, whose copier keeps a blob that carries its part's metadata.
    if (otherBlobEtag && mode === 'files') {
      try {
        await runtime.landing
          .getBlockBlobClient(row.landingPath)
          .deleteIfExists({ conditions: { ifMatch: otherBlobEtag } });
      } catch (error) {
        // Changed again since the listing: the copy decides what to do with whatever is there now.
        if (!isStorageCondition(error, 'precondition-failed')) {
          throw classifyStorageError(error, 'delete a mismatched blob');
        }
      }
    }
    const reason = `found at the completion check: ${problem}; ${next}`;
    const version = byPath.get(row.path);
    if (!version) continue;
    try {
      await runtime.store.updatePart(version, { status: 'failed', lastError: reason });
    } catch (error) {
      // The row moved since this check read it: whoever moved it decides; the next check looks again.
      if (!(error instanceof ConcurrentUpdateError)) throw error;
      continue;
    }
    telemetry.track('part', { export: exportId, snapshot: snapshotId, part: row.path, outcome: 'failed', reason });
  }
  return false;
}

/**
 * Create-only, so concurrent completions write one manifest. One that is already there and lists the same parts the
 * same way is someone else's identical completion. One that lists a part this one does not is newer than what this
 * completion read: `changed-meanwhile`, and nothing is written. Otherwise it is from before Defender's file list for
 * this snapshot grew (or before a part was copied again), and is replaced under its ETag, only while the snapshot row
 * is still the one this completion read (`unchangedSinceRead`).
 */
async function writeManifest(
  blob: ReturnType<Runtime['landing']['getBlockBlobClient']>,
  manifest: SnapshotManifest,
  body: string,
  unchangedSinceRead: () => Promise<boolean>,
): Promise<'written' | 'changed-meanwhile'> {
  for (let attempt = 0; attempt < 5; attempt++) {
    let conditions: { ifNoneMatch: string } | { ifMatch: string } = { ifNoneMatch: '*' };
    if (attempt > 0) {
      const existing = await blob.download().catch((error: unknown) => {
        if (isStorageCondition(error, 'not-found')) return undefined;
        throw classifyStorageError(error, 'read _manifest.json');
      });
      if (existing?.etag) {
        const text = existing.readableStreamBody ? await streamToString(existing.readableStreamBody) : '';
        const listed = manifestSchema.safeParse(parseJson(text));
        if (listed.success) {
          const entries = (m: SnapshotManifest) => new Map(m.parts.map((p) => [p.path, JSON.stringify(p)]));
          const theirs = entries(listed.data);
          const ours = entries(manifest);
          if (theirs.size === ours.size && [...theirs].every(([path, entry]) => ours.get(path) === entry)) {
            return 'written';
          }
          if ([...theirs.keys()].some((path) => !ours.has(path))) return 'changed-meanwhile';
        }
        if (!(await unchangedSinceRead())) return 'changed-meanwhile';
        conditions = { ifMatch: existing.etag };
      }
    }
    try {
      await blob.upload(body, Buffer.byteLength(body), { blobHTTPHeaders: JSON_HEADERS, conditions });
      return 'written';
    } catch (error) {
      if (!isStorageCondition(error, 'already-exists', 'precondition-failed', 'conflict')) {
        throw classifyStorageError(error, 'write _manifest.json');
      }
    }
  }
  throw new MdvmError('transient', `_manifest.json for ${manifest.export}/${manifest.snapshot} kept changing under us`);
}

function buildManifest(snapshot: SnapshotRow, landed: PartRow[], now: Date): SnapshotManifest {
  const parts = [...landed]
    .sort((a, b) => a.path.localeCompare(b.path))
    .map((r) => ({
      path: r.landingPath,
      part: r.path,
      // The part row contract guarantees bytes on a landed row; never guess a size into a manifest.
      bytes: r.bytes ?? -1,
      md5: r.md5 ?? null,
      records: r.records ?? null,
      verification: r.verification ?? null,
    }));
  // No parts counted nothing: null, never 0 (the contract says null when not counted).
  const counted = parts.length > 0 && parts.every((p) => p.records !== null);
  return {
    v: 1,
    export: snapshot.exportId,
    exportTitle: exportTitle(snapshot.exportId),
    snapshot: snapshot.snapshotId,
    generatedTime: snapshot.generatedTime,
    completedAt: now.toISOString(),
    mode: snapshot.mode ?? 'files',
    ...(snapshot.mode === 'delta' && snapshot.since
      ? { window: { since: snapshot.since, until: snapshot.generatedTime } }
      : {}),
    totals: {
      parts: parts.length,
      bytes: parts.reduce((sum, p) => sum + p.bytes, 0),
      records: counted ? parts.reduce((sum, p) => sum + (p.records ?? 0), 0) : null,
    },
    parts,
  };
}

/** The manifest is checked against its contract before it is written: it is what downstream trusts. */
function checkedManifest(manifest: SnapshotManifest): SnapshotManifest {
  const result = manifestSchema.safeParse(manifest);
  if (!result.success) {
    throw new MdvmError(
      'fatal',
      `refusing to write _manifest.json for ${manifest.export}/${manifest.snapshot}: ${contractProblems(result.error)}`,
    );
  }
  return manifest;
}

const LATEST_ATTEMPTS = 20;

/**
 * Why a `_latest.json` pointer leads nowhere, if it does: it must name its own export, the manifest path its
 * generatedTime gives, and that manifest must be there (a completion writes the manifest before the pointer).
 */
export async function latestPointerProblem(
  runtime: Runtime,
  exportId: string,
  pointer: LatestPointer,
): Promise<string | undefined> {
  const expected = manifestPath(exportId, snapshotIdOf(pointer.generatedTime));
  if (
    pointer.export !== exportId ||
    pointer.manifest !== expected ||
    pointer.snapshot !== snapshotIdOf(pointer.generatedTime)
  ) {
    return `points at ${pointer.manifest} for export '${pointer.export}', not at ${expected}`;
  }
  const there = await runtime.landing
    .getBlockBlobClient(expected)
    .exists()
    .catch((error: unknown) => {
      throw classifyStorageError(error, 'read the manifest _latest.json points at');
    });
  return there ? undefined : `points at ${pointer.generatedTime}, whose manifest ${expected} is not there`;
}

/**
 * `_latest.json` only ever moves to a newer generatedTime, under ETag guard. Throws when it cannot be moved (a lease
 * on it, a pointer that keeps changing): the caller leaves the snapshot incomplete and says why.
 */
async function advanceLatest(
  runtime: Runtime,
  exportId: string,
  snapshot: SnapshotRow,
  manifest: string,
): Promise<void> {
  const blob = runtime.landing.getBlockBlobClient(latestPath(exportId));
  for (let attempt = 0; attempt < LATEST_ATTEMPTS; attempt++) {
    let etag: string | undefined;
    try {
      // Body and ETag from one response: a pointer read with another write's ETag could move backwards.
      const response = await blob.download();
      etag = response.etag;
      const body = response.readableStreamBody ? await streamToString(response.readableStreamBody) : '';
      // A pointer that is not JSON or breaks its contract is replaced (still under its ETag).
      const pointer = latestSchema.safeParse(parseJson(body));
      // A newer pointer stays only while it leads somewhere: one aimed at a snapshot that never completed (a wrong
      // clock, a hand edit) would otherwise pin the export for good.
      if (
        pointer.success &&
        compareGeneratedTime(pointer.data.generatedTime, snapshot.generatedTime) >= 0 &&
        (pointer.data.generatedTime === snapshot.generatedTime ||
          (await latestPointerProblem(runtime, exportId, pointer.data)) === undefined)
      ) {
        return;
      }
    } catch (error) {
      if (!isStorageCondition(error, 'not-found')) throw classifyStorageError(error, 'read _latest.json');
    }
    const pointer: LatestPointer = {
      v: 1,
      export: exportId,
      snapshot: snapshot.snapshotId,
      generatedTime: snapshot.generatedTime,
      manifest,
      updatedAt: runtime.now().toISOString(),
    };
    const body = `${JSON.stringify(latestSchema.parse(pointer), null, 2)}\n`;
    try {
      await blob.upload(body, Buffer.byteLength(body), {
        blobHTTPHeaders: JSON_HEADERS,
        conditions: etag ? { ifMatch: etag } : { ifNoneMatch: '*' },
      });
      return;
    } catch (error) {
      // A lease (or any other lock) is not a lost race: reading again cannot help.
      if (/^Lease/.test((error as { code?: string }).code ?? '')) {
        throw new MdvmError(
          'fatal',
          `${classifyStorageError(error, 'write _latest.json').message} (a lease holds it)`,
          {
            cause: error,
          },
        );
      }
      // Another writer moved it (ETag) or created it first: read again.
      if (!isStorageCondition(error, 'precondition-failed', 'already-exists', 'conflict')) {
        throw classifyStorageError(error, 'write _latest.json');
      }
    }
  }
  throw new MdvmError('transient', `_latest.json kept changing under us (${LATEST_ATTEMPTS} attempts)`);
}

/**
 * Self-healing: counters that lag behind the part rows (a crash between landing a part and counting it)
 * are raised to match. Never lowered: the listing may be older than increments made since.
 */
/**
 * After a part settles, or a tick has written its rows: complete the snapshot when no part is left. When nothing is in
 * flight any more but parts are left (expired, or failed for good: source gone, corrupt, out of attempts), bring the
 * snapshot row's counters up to the part rows, once per stall, and mark it `failed` if a part failed and every part's
 * row is written. The next timer tick retries those parts with fresh URLs and puts the snapshot back to `copying`;
 * until then the row says where it stopped. Costs one small read while a part is still queued. True when complete.
 */
export async function settleSnapshotFromRows(
  runtime: Runtime,
  telemetry: Telemetry,
  exportId: string,
  snapshotId: string,
  generatedTime: string,
): Promise<boolean> {
  const progress = await runtime.store.partProgress(exportId, snapshotId);
  if (progress.state === 'all-landed') {
    return inSpan(SPAN_NAMES.complete, { export: exportId, snapshot: snapshotId }, async (span) => {
      const complete = await completeSnapshotIfReady(runtime, telemetry, exportId, generatedTime);
      annotate(span, { outcome: complete ? 'complete' : 'incomplete' });
      return complete;
    });
  }
  if (progress.state === 'stuck') {
    const rows = (await runtime.store.listParts(exportId, snapshotId)).map((p) => p.value);
    const landed = rows.filter((p) => p.status === 'landed');
    await runtime.store.mutateSnapshot(exportId, generatedTime, (s) => {
      if (s.status !== 'copying' && s.status !== 'requested') return undefined;
      return {
        partsLanded: Math.max(s.partsLanded, landed.length),
        bytesLanded: Math.max(
          s.bytesLanded,
          landed.reduce((sum, p) => sum + (p.bytes ?? 0), 0),
        ),
        ...(progress.failed && rowsCoverSnapshot(s, rows.length) ? { status: 'failed' as const } : {}),
      };
    });
  }
  return false;
}

/**
 * Whether `rowCount` part rows are every part of the snapshot. A tick writes new rows while its messages go out, so a
 * check can meet fewer: the rest are still being written, or left for the next tick by a write that failed. Until
 * they exist, parts are still to come, and nothing may conclude the snapshot is stuck.
 */
export function rowsCoverSnapshot(snapshot: SnapshotRow, rowCount: number): boolean {
  return rowCount >= snapshot.partCount - (snapshot.partsRefused ?? 0);
}

export async function reconcileCounters(runtime: Runtime, snapshot: SnapshotRow, landed: PartRow[]): Promise<void> {
  const bytes = landed.reduce((sum, r) => sum + (r.bytes ?? 0), 0);
  await runtime.store.mutateSnapshot(snapshot.exportId, snapshot.generatedTime, (row) =>
    row.status === 'complete' || row.partsLanded >= landed.length
      ? undefined
      : { partsLanded: landed.length, bytesLanded: Math.max(row.bytesLanded, bytes) },
  );
}
