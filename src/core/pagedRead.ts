import { pipeline } from 'node:stream/promises';
import { createGzip } from 'node:zlib';
import { BlockUploadSink } from './blockUpload.js';
import { DELTA_EXPORT, type ExportId, getExportType } from './catalog.js';
import { completeSnapshotIfReady } from './completion.js';
import type { PartRow, SnapshotRow } from './contracts.js';
import { classifyStorageError, errorMessage, isNetworkError, isStorageCondition, MdvmError } from './errors.js';
import { annotate, inSpan, record, SPAN_NAMES } from './observability.js';
import { ODataRecordsTransform } from './odataRecords.js';
import { canonicalGeneratedTime, compareGeneratedTime, landingPath, snapshotIdOf } from './parts.js';
import { carriesCredential, redact } from './redact.js';
import type { Runtime } from './runtime.js';
import type { Telemetry } from './telemetry.js';

/**
 * The two paged ways Defender serves this data, landed in the same layout and manifest contract as via files:
 *
 * - **JSON mode** (`MDVM_JSON_EXPORTS`): a full snapshot read from the type's `…ByMachine` endpoint. Each page lands
 *   as one part, `json/page-NNNNN.json.gz` (gzip JSON Lines, as Defender's own part files), streamed through
 *   without holding a page. The snapshot is named after the time the read began: the JSON endpoints do not say
 *   when Defender generated the data.
 * - **Delta** (`MDVM_DELTA_SCHEDULE`): the software-vulnerability changes since the watermark, landed as a window
 *   under its own export id. The watermark is the `nextSince` of the newest complete window: it moves only when a
 *   window's manifest is written, in the same row write that completes it.
 *
 * Both keep their place in the snapshot row (`cursor`: the next page's URL, `partsLanded`: its index), so a read
 * cut short (a failure, a timeout, a crash) resumes at the page it stopped at on the next tick.
 */

export type PagedOutcome = 'enqueued' | 'resumed' | 'completed' | 'unchanged' | 'refused' | 'failed';

export interface PagedTickResult {
  readonly exportId: string;
  readonly snapshotId: string;
  readonly generatedTime: string;
  readonly outcome: PagedOutcome;
  readonly pagesLanded: number;
  readonly recordsLanded: number;
  readonly reason?: string;
}

interface Endpoint {
  readonly path: string;
  readonly exportId: string;
  readonly permission: string;
}

/** Never ask for a sinceTime this close to the 14-day limit: the clocks of the app and Defender differ. */
const LOOKBACK_MARGIN_IN_MS = 15 * 60_000;
const PAGE_ATTEMPTS = 3;
/** Errors of a page body that broke off after a 200 (the request itself is retried by the client). */
const brokenBodies = new WeakSet<Error>();
/** Errors of a page request Defender refused (400) or that the client would not send (a foreign nextLink). */
const refusedByDefender = new WeakSet<Error>();
/** Errors of a reader that lost a race with another reader of the same page. */
const overlapping = new WeakSet<Error>();

function refused(error: MdvmError): MdvmError {
  refusedByDefender.add(error);
  return error;
}

/** The row's cursor as a URL; a link that is not absolute cannot be followed and fails the read. */
function pageUrl(cursor: string, endpoint: Endpoint): URL {
  try {
    return new URL(cursor);
  } catch {
    throw refused(new MdvmError('invalid-input', `${endpoint.path}: the next page's link is not an absolute URL`));
  }
}

/** A full snapshot of `exportId` through its paged JSON endpoint; resumes an unfinished one first. */
export async function requestJsonSnapshot(
  runtime: Runtime,
  telemetry: Telemetry,
  exportId: ExportId,
  options: { abortSignal?: AbortSignal } = {},
): Promise<PagedTickResult> {
  const type = getExportType(exportId);
  if (!('jsonPath' in type)) throw new MdvmError('fatal', `${exportId} has no paged JSON endpoint`);
  const endpoint = { path: type.jsonPath, exportId, permission: type.permission };
  return inSpan(SPAN_NAMES.tick, { export: exportId, mode: 'json' }, async (span) => {
    const unfinished = await unfinishedRead(runtime, exportId);
    let row = unfinished;
    if (!row) {
      const generatedTime = canonicalGeneratedTime(runtime.now().toISOString());
      const existing = await runtime.store.getSnapshot(exportId, generatedTime);
      if (existing) return unchanged(telemetry, existing.value, 'a JSON read already began at this instant');
      const first = new URL(`${runtime.config.defender.baseUrl}${type.jsonPath}`);
      first.searchParams.set('pageSize', String(runtime.config.pageSize));
      row = await startRead(runtime, exportId, generatedTime, first, { mode: 'json' });
    }
    const result = await landPages(runtime, telemetry, row, endpoint, unfinished ? 'resumed' : 'enqueued', options);
    annotate(span, { snapshot: result.snapshotId, outcome: result.outcome, 'pages.landed': result.pagesLanded });
    return result;
  });
}

/** The next delta window, from the watermark to now; resumes an unfinished window first. */
export async function requestDelta(
  runtime: Runtime,
  telemetry: Telemetry,
  options: { abortSignal?: AbortSignal } = {},
): Promise<PagedTickResult> {
  const exportId = DELTA_EXPORT.id;
  const endpoint = { path: DELTA_EXPORT.apiPath, exportId, permission: DELTA_EXPORT.permission };
  return inSpan(SPAN_NAMES.tick, { export: exportId, mode: 'delta' }, async (span) => {
    const unfinished = await unfinishedRead(runtime, exportId);
    let row = unfinished;
    if (!row) {
      const start = await deltaStart(runtime);
      if ('refused' in start) {
        telemetry.track('request', { export: exportId, outcome: 'refused', reason: start.refused });
        annotate(span, { outcome: 'refused' });
        return {
          exportId,
          snapshotId: '',
          generatedTime: '',
          outcome: 'refused',
          pagesLanded: 0,
          recordsLanded: 0,
          reason: start.refused,
        };
      }
      const until = canonicalGeneratedTime(runtime.now().toISOString());
      if (compareGeneratedTime(start.since, until) >= 0) {
        const reason = `no new slice yet: the next window starts at ${start.since}`;
        telemetry.track('request', { export: exportId, outcome: 'unchanged', reason });
        return {
          exportId,
          snapshotId: '',
          generatedTime: '',
          outcome: 'unchanged',
          pagesLanded: 0,
          recordsLanded: 0,
          reason,
        };
      }
      const existing = await runtime.store.getSnapshot(exportId, until);
      if (existing) return unchanged(telemetry, existing.value, 'a window already ends at this instant');
      const first = new URL(`${runtime.config.defender.baseUrl}${DELTA_EXPORT.apiPath}`);
      first.searchParams.set('sinceTime', start.since);
      first.searchParams.set('pageSize', String(runtime.config.pageSize));
      row = await startRead(runtime, exportId, until, first, { mode: 'delta', since: start.since });
      if (start.note)
        telemetry.track('request', {
          export: exportId,
          snapshot: row.snapshotId,
          outcome: 'resumed',
          reason: start.note,
        });
    }
    const result = await landPages(runtime, telemetry, row, endpoint, unfinished ? 'resumed' : 'enqueued', options);
    annotate(span, { snapshot: result.snapshotId, outcome: result.outcome, 'pages.landed': result.pagesLanded });
    return result;
  });
}

/**
 * Where the next window starts: the watermark (the newest complete window's nextSince) or, with none or one older
 * than Defender keeps changes (14 days), the generatedTime of the newest complete full software-vulnerabilities
 * snapshot, which holds everything up to then. Without either the delta cannot start, and says why.
 */
async function deltaStart(runtime: Runtime): Promise<{ since: string; note?: string } | { refused: string }> {
  const oldestAllowed = runtime.now().getTime() - DELTA_EXPORT.maxLookbackInMs + LOOKBACK_MARGIN_IN_MS;
  const windows = await runtime.store.listSnapshots(DELTA_EXPORT.id);
  const watermark = windows
    .map((w) => w.value)
    .filter((w) => w.status === 'complete' && w.nextSince)
    .at(-1)?.nextSince;
  if (watermark && Date.parse(watermark) >= oldestAllowed) return { since: watermark };
  const full = (await runtime.store.listSnapshots(DELTA_EXPORT.fullExportId))
    .map((s) => s.value)
    .filter((s) => s.status === 'complete')
    .at(-1);
  const fullUsable = full && Date.parse(full.generatedTime) >= oldestAllowed;
  if (fullUsable && (!watermark || compareGeneratedTime(full.generatedTime, watermark) > 0)) {
    return {
      since: full.generatedTime,
      note: watermark
        ? `the watermark ${watermark} is older than Defender keeps changes (14 days); the delta restarts from the full snapshot ${full.snapshotId}`
        : `no watermark yet; the delta starts from the full snapshot ${full.snapshotId}`,
    };
  }
  return {
    refused: watermark
      ? `the watermark ${watermark} is older than Defender keeps changes (14 days): land a full ${DELTA_EXPORT.fullExportId} snapshot (it must be in MDVM_EXPORTS); the delta restarts from its generatedTime`
      : `no watermark yet: the delta starts from a complete ${DELTA_EXPORT.fullExportId} snapshot of the last 14 days; add ${DELTA_EXPORT.fullExportId} to MDVM_EXPORTS and let it complete`,
  };
}

async function unfinishedRead(runtime: Runtime, exportId: string): Promise<SnapshotRow | undefined> {
  const unfinished = (await runtime.store.listSnapshots(exportId))
    .map((s) => s.value)
    .filter((s) => (s.mode === 'json' || s.mode === 'delta') && (s.status === 'copying' || s.status === 'requested'));
  const newest = unfinished.at(-1);
  // Two reads started at once (two first ticks): the newest goes on, the others are superseded, never left open.
  for (const older of unfinished.slice(0, -1)) {
    await runtime.store.mutateSnapshot(exportId, older.generatedTime, (row) =>
      row.status === 'copying' || row.status === 'requested'
        ? { status: 'superseded', supersededBy: newest?.generatedTime ?? row.generatedTime }
        : undefined,
    );
  }
  return newest;
}

async function startRead(
  runtime: Runtime,
  exportId: string,
  generatedTime: string,
  first: URL,
  extra: Pick<SnapshotRow, 'mode' | 'since'>,
): Promise<SnapshotRow> {
  const now = runtime.now().toISOString();
  const created = await runtime.store.createSnapshot({
    exportId,
    generatedTime,
    snapshotId: snapshotIdOf(generatedTime),
    status: 'copying',
    partCount: 1,
    partsLanded: 0,
    bytesLanded: 0,
    recordsLanded: 0,
    requestedAt: now,
    lastRequestedAt: now,
    cursor: first.toString(),
    ...extra,
    ...(extra.since ? { nextSince: extra.since } : {}),
  });
  return created.value;
}

function unchanged(telemetry: Telemetry, row: SnapshotRow, why: string): PagedTickResult {
  telemetry.track('request', { export: row.exportId, snapshot: row.snapshotId, outcome: 'unchanged', reason: why });
  return {
    exportId: row.exportId,
    snapshotId: row.snapshotId,
    generatedTime: row.generatedTime,
    outcome: 'unchanged',
    pagesLanded: row.partsLanded,
    recordsLanded: row.recordsLanded ?? 0,
    reason: why,
  };
}

/** Land pages from the row's cursor until the last one, then complete the snapshot (manifest, _latest.json). */
async function landPages(
  runtime: Runtime,
  telemetry: Telemetry,
  start: SnapshotRow,
  endpoint: Endpoint,
  outcome: 'enqueued' | 'resumed',
  options: { abortSignal?: AbortSignal },
): Promise<PagedTickResult> {
  const { exportId, generatedTime, snapshotId } = start;
  let row = start;
  telemetry.track('request', {
    export: exportId,
    snapshot: snapshotId,
    outcome,
    reason: `${outcome === 'resumed' ? 'resuming' : 'reading'} ${row.mode === 'delta' ? `the changes since ${row.since}` : 'the paged JSON snapshot'} at page ${row.partsLanded}`,
  });
  while (row.cursor) {
    if (options.abortSignal?.aborted) {
      throw new MdvmError('transient', `${exportId}: stopped at page ${row.partsLanded}; the next tick resumes there`);
    }
    const page = row.partsLanded;
    const relativePath = `json/page-${String(page).padStart(5, '0')}.json.gz`;
    let landed: LandedPage;
    let sourcePath = '';
    try {
      const url = pageUrl(row.cursor, endpoint);
      sourcePath = sourcePathOf(url);
      landed = await landPageWithRetries(
        runtime,
        endpoint,
        url,
        {
          blobName: landingPath(exportId, snapshotId, relativePath),
          // The same metadata as a copied part; the source is the page's URL path and query (no credential in it).
          metadata: {
            mdvm_export: exportId,
            mdvm_generated_time: generatedTime,
            mdvm_source_path: sourcePath.slice(0, 2000),
            mdvm_mode: row.mode ?? 'json',
          },
        },
        options,
      );
      if (landed.nextLink && carriesCredential(landed.nextLink)) {
        throw refused(
          new MdvmError(
            'invalid-input',
            `${endpoint.path}: the next page's link carries a credential; it is neither stored nor followed`,
          ),
        );
      }
    } catch (error) {
      const reason = `page ${page}: ${errorMessage(error)}`;
      // Throttling, a broken connection, an expired token, an overlapping reader: resume at this page on the next
      // tick. Anything that will fail again the same way (Defender refusing the page, a malformed page, a nextLink
      // off the API) fails the read instead, and the next tick starts a new one: never a read stuck for good.
      const resumable =
        overlapping.has(error as Error) ||
        (error instanceof MdvmError &&
          !refusedByDefender.has(error) &&
          (error.retryable || error.kind === 'forbidden'));
      await runtime.store.mutateSnapshot(exportId, generatedTime, (current) =>
        current.status === 'copying'
          ? { lastError: reason, ...(resumable ? {} : { status: 'failed' as const }) }
          : undefined,
      );
      record.failure(exportId, error instanceof MdvmError ? error.kind : 'transient');
      telemetry.track('part', {
        export: exportId,
        snapshot: snapshotId,
        part: relativePath,
        outcome: 'failed',
        reason,
      });
      throw error instanceof MdvmError ? error : new MdvmError('fatal', reason, { cause: error });
    }
    await upsertLandedPart(runtime, {
      exportId,
      snapshotId,
      path: relativePath,
      sourcePath,
      landingPath: landingPath(exportId, snapshotId, relativePath),
      status: 'landed',
      attempts: landed.attempts,
      bytes: landed.bytes,
      md5: landed.md5,
      records: landed.records,
      durationMs: landed.durationMs,
      copyMethod: row.mode === 'delta' ? 'delta-page' : 'json-page',
      verification: 'md5',
      landedAt: runtime.now().toISOString(),
      lastError: '',
    });
    const next = landed.nextLink;
    // Only the reader that lands the page the row expects moves it; another one that overlapped stops here.
    let moved = false;
    const updated = await runtime.store.mutateSnapshot(exportId, generatedTime, (current) => {
      moved = current.partsLanded === page && current.status === 'copying';
      if (!moved) return undefined;
      return {
        cursor: next ?? '',
        partsLanded: page + 1,
        partCount: next ? page + 2 : page + 1,
        bytesLanded: current.bytesLanded + landed.bytes,
        recordsLanded: (current.recordsLanded ?? 0) + landed.records,
        lastRequestedAt: runtime.now().toISOString(),
        lastError: '',
        ...(current.mode === 'delta' && landed.newestEvent
          ? { nextSince: laterOf(current.nextSince ?? current.since ?? '', sliceStartOf(landed.newestEvent)) }
          : {}),
      };
    });
    if (!moved || !updated) {
      const lost = new MdvmError(
        'transient',
        `${exportId} ${snapshotId}: another reader moved past page ${page}; this one stops`,
      );
      overlapping.add(lost);
      throw lost;
    }
    row = updated;
    record.partOutcome(exportId, 'landed');
    record.landed(exportId, landed.bytes, landed.durationMs, row.mode === 'delta' ? 'delta-page' : 'json-page');
    telemetry.track('part', {
      export: exportId,
      snapshot: snapshotId,
      part: relativePath,
      bytes: landed.bytes,
      records: landed.records,
      durationMs: landed.durationMs,
      method: row.mode === 'delta' ? 'delta-page' : 'json-page',
      outcome: 'landed',
    });
  }
  const complete = await completeSnapshotIfReady(runtime, telemetry, exportId, generatedTime);
  return {
    exportId,
    snapshotId,
    generatedTime,
    outcome: complete ? 'completed' : outcome,
    pagesLanded: row.partsLanded,
    recordsLanded: row.recordsLanded ?? 0,
  };
}

interface LandedPage {
  readonly bytes: number;
  readonly md5: string;
  readonly records: number;
  readonly nextLink: string | undefined;
  readonly newestEvent: string | undefined;
  readonly durationMs: number;
  readonly attempts: number;
}

/** A page whose body breaks off (a dropped connection, a truncated JSON) is asked for again, at most 3 times. */
async function landPageWithRetries(
  runtime: Runtime,
  endpoint: Endpoint,
  url: URL,
  target: { blobName: string; metadata: Record<string, string> },
  options: { abortSignal?: AbortSignal },
): Promise<LandedPage> {
  for (let attempt = 1; ; attempt++) {
    try {
      return { ...(await landPage(runtime, endpoint, url, target, options)), attempts: attempt };
    } catch (error) {
      // Only a body that broke off is asked for again here: the client has already retried the request itself.
      if (!brokenBodies.has(error as Error) || attempt >= PAGE_ATTEMPTS || options.abortSignal?.aborted) {
        throw error instanceof MdvmError
          ? error
          : new MdvmError('transient', `${endpoint.path}: ${errorMessage(error)}`, { cause: error });
      }
    }
  }
}

/**
 * One page: GET (with the client's budget and retries) → records as JSON Lines → gzip → staged blocks → commit
 * with its MD5 → read back: the blob must have the length and MD5 that went in.
 */
async function landPage(
  runtime: Runtime,
  endpoint: Endpoint,
  url: URL,
  target: { blobName: string; metadata: Record<string, string> },
  options: { abortSignal?: AbortSignal },
): Promise<Omit<LandedPage, 'attempts'>> {
  const { blobName } = target;
  const started = Date.now();
  const body = await runtime.defender.openPage(url, endpoint, options).catch((error: unknown) => {
    if (error instanceof MdvmError && (error.statusCode === 400 || error.kind === 'invalid-input')) {
      refusedByDefender.add(error);
    }
    throw error;
  });
  let newestEvent: string | undefined;
  const records = new ODataRecordsTransform({
    what: endpoint.path,
    ...(endpoint.exportId === DELTA_EXPORT.id
      ? {
          onRecord: (bytes: Buffer) => {
            const at = eventTimestampOf(bytes);
            if (at && (!newestEvent || compareGeneratedTime(at, newestEvent) > 0)) newestEvent = at;
          },
        }
      : {}),
  });
  const blob = runtime.landing.getBlockBlobClient(blobName);
  // The blob as it is before this attempt (absent, or left by a crashed one): the commit replaces exactly that, so a
  // reader that overlapped and committed first makes this commit fail instead of overwriting a landed page.
  const before = await blob.getProperties({ abortSignal: options.abortSignal }).then(
    (props) => props.etag,
    (error: unknown) => {
      if (isStorageCondition(error, 'not-found')) return undefined;
      throw classifyStorageError(error, 'read a page blob before landing it');
    },
  );
  const sink = new BlockUploadSink(blob, {
    blockBytes: runtime.config.copy.streamBufferBytes,
    blocks: runtime.config.copy.streamBuffers,
    ...(options.abortSignal ? { abortSignal: options.abortSignal } : {}),
  });
  try {
    await pipeline(body, records, createGzip(), sink);
  } catch (error) {
    body.destroy();
    const truncated = error instanceof MdvmError && /truncated/.test(error.message);
    if (truncated || isNetworkError(error) || /terminated|aborted|closed|socket/i.test(errorMessage(error))) {
      const broken = new MdvmError('transient', `${endpoint.path}: the page broke off: ${errorMessage(error)}`, {
        cause: error,
      });
      brokenBodies.add(broken);
      throw broken;
    }
    if (error instanceof MdvmError) throw error;
    throw classifyStorageError(error, 'land a page');
  }
  let committed: { md5: string; bytes: number };
  try {
    committed = await sink.commit({
      contentType: 'application/gzip',
      metadata: target.metadata,
      conditions: before ? { ifMatch: before } : { ifNoneMatch: '*' },
    });
  } catch (error) {
    if (!isStorageCondition(error, 'precondition-failed', 'already-exists', 'conflict')) throw error;
    const lost = new MdvmError('transient', `${blobName}: another reader landed this page first; this one stops`, {
      cause: error,
    });
    overlapping.add(lost);
    throw lost;
  }
  const { md5, bytes } = committed;
  const props = await blob.getProperties({ abortSignal: options.abortSignal }).catch((error: unknown) => {
    throw classifyStorageError(error, 'read back a landed page');
  });
  const storedMd5 = props.contentMD5 ? Buffer.from(props.contentMD5).toString('base64') : undefined;
  if (props.contentLength !== bytes || storedMd5 !== md5) {
    throw new MdvmError(
      'transient',
      `${blobName}: the landed page has ${props.contentLength} bytes and MD5 ${storedMd5}, not ${bytes} and ${md5}`,
    );
  }
  return {
    bytes,
    md5,
    records: records.records,
    nextLink: records.nextLink,
    newestEvent,
    durationMs: Date.now() - started,
  };
}

async function upsertLandedPart(runtime: Runtime, row: PartRow): Promise<void> {
  const existing = await runtime.store.getPart(row.exportId, row.snapshotId, row.path);
  if (existing) await runtime.store.updatePart(existing, row);
  else await runtime.store.insertParts([row]);
}

/** The page's URL as recorded: path and query (no secret in either), redacted all the same. */
function sourcePathOf(url: URL): string {
  return redact(`${url.pathname}${url.search}`).slice(0, 4000);
}

const EVENT_KEYS = [Buffer.from('"eventTimestamp":"'), Buffer.from('"EventTimestamp":"')];

function eventTimestampOf(record: Buffer): string | undefined {
  for (const key of EVENT_KEYS) {
    const at = record.indexOf(key);
    if (at === -1) continue;
    const start = at + key.length;
    const end = record.indexOf(0x22, start);
    const text = record.toString('utf8', start, end);
    return Number.isNaN(Date.parse(text)) ? undefined : new Date(text).toISOString();
  }
  return undefined;
}

/**
 * Start of the 6-hour slice `time` falls in: where the next window's sinceTime goes. Defender answers from the slice
 * that sinceTime falls in, so the next window reads the newest slice again: a slice that gained changes after this
 * window read it loses none (downstream sees that slice's changes twice and de-duplicates them).
 */
function sliceStartOf(time: string): string {
  const slice = DELTA_EXPORT.sliceInMs;
  return new Date(Math.floor(Date.parse(time) / slice) * slice).toISOString();
}

function laterOf(a: string, b: string): string {
  if (!a) return b;
  return compareGeneratedTime(a, b) >= 0 ? a : b;
}
