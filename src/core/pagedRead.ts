import { pipeline } from 'node:stream/promises';
import { createGzip } from 'node:zlib';
import { BlockUploadSink } from './blockUpload.js';
import { DELTA_EXPORT, type ExportId, getExportType } from './catalog.js';
import { completeSnapshotIfReady } from './completion.js';
import type { PartRow, SnapshotRow } from './contracts.js';
import { classifyStorageError, errorMessage, isNetworkError, isStorageCondition, MdvmError } from './errors.js';
import { ConcurrentUpdateError } from './manifestStore.js';
import { annotate, inSpan, record, SPAN_NAMES } from './observability.js';
import { ODataRecordsTransform } from './odataRecords.js';
import { canonicalGeneratedTime, compareGeneratedTime, landingPath, snapshotIdOf } from './parts.js';
import { carriesCredential, redact } from './redact.js';
import { MAX_CLOCK_SKEW_IN_MS } from './requestSnapshot.js';
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
/** How much older than its read the data of a JSON-mode snapshot may be (Defender regenerates it daily at most). */
const JSON_DATA_AGE_ALLOWANCE_IN_MS = 24 * 3_600_000;
const PAGE_ATTEMPTS = 3;
/** Errors of a page body that broke off after a 200 (the request itself is retried by the client). */
const brokenBodies = new WeakSet<Error>();
/** Errors of a page request Defender refused (400) or that the client would not send (a foreign nextLink). */
const refusedByDefender = new WeakSet<Error>();
/** Errors of a reader that lost a race with another reader of the same page. */
const overlapping = new WeakSet<Error>();
/** Errors of a page whose JSON ended early although the response itself ended cleanly. */
const cleanTruncations = new WeakSet<Error>();

/**
 * A landed page blob is written once and carries what its reader learnt from it, so a reader that finds it (one that
 * overlapped, or the next tick after a crash between the commit and the row) adopts it instead of writing it again.
 */
const PAGE_RECORDS_KEY = 'mdvm_page_records';
const PAGE_NEXT_LINK_KEY = 'mdvm_next_link';
const PAGE_NEWEST_EVENT_KEY = 'mdvm_newest_event';
/** Blob metadata holds 8 KiB in all; a nextLink is kept in it beside the source path (2,000) and the other keys. */
const MAX_NEXT_LINK_CHARS = 5_000;

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
    const unfinished = await unfinishedRead(runtime, telemetry, exportId);
    let row = unfinished;
    if (!row) {
      const wrongClock = await clockRefusal(runtime, telemetry, exportId);
      if (wrongClock) return wrongClock;
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
    const unfinished = await unfinishedRead(runtime, telemetry, exportId);
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
      const wrongClock = await clockRefusal(runtime, telemetry, exportId);
      if (wrongClock) return wrongClock;
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
    // A JSON-mode snapshot is named after when its read began, not when Defender generated the data it served,
    // which may be hours older: changes in between would fall in no window. Start a day earlier (changes seen twice
    // are duplicates downstream removes), but never at the 14-day limit itself, where a page asked for later would
    // fall outside what Defender keeps.
    const since =
      full.mode === 'json'
        ? canonicalGeneratedTime(
            new Date(
              Math.max(Date.parse(full.generatedTime) - JSON_DATA_AGE_ALLOWANCE_IN_MS, oldestAllowed + 3_600_000),
            ).toISOString(),
          )
        : full.generatedTime;
    const clamped =
      full.mode === 'json' && Date.parse(since) > Date.parse(full.generatedTime) - JSON_DATA_AGE_ALLOWANCE_IN_MS;
    const from = `the full snapshot ${full.snapshotId}${full.mode === 'json' ? ` (JSON mode: from ${since}, ${clamped ? 'the oldest change Defender still keeps, less than a day before the read: changes older than that are not asked for' : 'a day earlier, since the data may be older than the read'})` : ''}`;
    return {
      since,
      note: watermark
        ? `the watermark ${watermark} is older than Defender keeps changes (14 days); the delta restarts from ${from}`
        : `no watermark yet; the delta starts from ${from}`,
    };
  }
  return {
    refused: watermark
      ? `the watermark ${watermark} is older than Defender keeps changes (14 days): land a full ${DELTA_EXPORT.fullExportId} snapshot (it must be in MDVM_EXPORTS); the delta restarts from its generatedTime`
      : `no watermark yet: the delta starts from a complete ${DELTA_EXPORT.fullExportId} snapshot of the last 14 days; add ${DELTA_EXPORT.fullExportId} to MDVM_EXPORTS and let it complete`,
  };
}

/**
 * A paged read is named after this machine's clock (Defender's JSON endpoints say nothing of when the data was made):
 * a clock far ahead would name a snapshot that sorts after every real one and holds `_latest.json` until the clock
 * of the world catches up. The storage service's clock (the Date of one cheap response) is the check; a read does not
 * start while the two differ by more than the skew via files allows. No answer to compare with: no check.
 */
async function clockRefusal(
  runtime: Runtime,
  telemetry: Telemetry,
  exportId: string,
): Promise<PagedTickResult | undefined> {
  const serviceTime = await runtime.landing.getProperties().then(
    (props) => props.date,
    () => undefined,
  );
  if (!serviceTime) return undefined;
  const offInMs = runtime.now().getTime() - serviceTime.getTime();
  if (Math.abs(offInMs) <= MAX_CLOCK_SKEW_IN_MS) return undefined;
  const reason = `this machine's clock (${runtime.now().toISOString()}) is ${Math.round(Math.abs(offInMs) / 60_000)} minutes ${offInMs > 0 ? 'ahead of' : 'behind'} the storage service's (${serviceTime.toISOString()}): a paged read is named after it, so none starts until the clock is right`;
  telemetry.track('request', { export: exportId, outcome: 'refused', reason });
  return { exportId, snapshotId: '', generatedTime: '', outcome: 'refused', pagesLanded: 0, recordsLanded: 0, reason };
}

async function unfinishedRead(
  runtime: Runtime,
  telemetry: Telemetry,
  exportId: string,
): Promise<SnapshotRow | undefined> {
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
    telemetry.track('request', {
      export: exportId,
      snapshot: older.snapshotId,
      outcome: 'superseded',
      reason: `another read of ${exportId} began at the same time; ${newest?.snapshotId ?? 'the newest'} goes on`,
    });
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
      // A nextLink cycle (A → B → A) never ends on its own: the read stops where a via-files listing would be refused.
      if (page >= runtime.config.maxPartsPerSnapshot) {
        throw refused(
          new MdvmError(
            'invalid-input',
            `${endpoint.path}: more than ${runtime.config.maxPartsPerSnapshot} pages (MDVM_MAX_PARTS_PER_SNAPSHOT); the next page's links may loop`,
          ),
        );
      }
      const url = pageUrl(row.cursor, endpoint);
      sourcePath = sourcePathOf(url);
      landed = await landPageWithRetries(
        runtime,
        endpoint,
        url,
        {
          blobName: landingPath(exportId, snapshotId, relativePath),
          expectsPage: async () => {
            const now = await runtime.store.getSnapshot(exportId, generatedTime);
            return now?.value.status === 'copying' && now.value.partsLanded === page;
          },
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
      // Checked before the commit as well; again here for a page adopted from the blob another reader wrote.
      const problem = landed.nextLink ? nextLinkProblem(landed.nextLink, runtime, endpoint, url) : undefined;
      if (problem) throw refused(new MdvmError('invalid-input', `${endpoint.path}: ${problem}`));
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
      // A read that failed for good is over (the next tick starts another): say so with its id, so the late-snapshot
      // alert and the workbook do not wait on it.
      if (!resumable) telemetry.track('request', { export: exportId, snapshot: snapshotId, outcome: 'failed', reason });
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
        // An event stamped after the window's end (a wrong clock upstream, or a forged page) must not move the
        // watermark past it: every later window would start in the future and ask Defender nothing.
        ...(current.mode === 'delta' && landed.newestEvent
          ? {
              nextSince: laterOf(
                current.nextSince ?? current.since ?? '',
                sliceStartOf(earlierOf(landed.newestEvent, current.generatedTime)),
              ),
            }
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
  // A full inventory with no record in it is far likelier an upstream fault than the truth, and a complete snapshot
  // would tell downstream every device and finding is gone. As for an empty file list, nothing is recorded: the
  // page blobs, then the rows; the next tick reads again.
  if (row.mode === 'json' && (row.recordsLanded ?? 0) === 0) {
    const reason = `${endpoint.path} served no record: an empty full snapshot is not recorded; the next tick reads again`;
    for (const part of await runtime.store.listParts(exportId, snapshotId)) {
      await runtime.landing
        .getBlockBlobClient(part.value.landingPath)
        .deleteIfExists()
        .catch((error: unknown) => {
          throw classifyStorageError(error, 'delete the page of an empty read');
        });
    }
    await forgetEmptyRead(runtime, exportId, generatedTime);
    telemetry.track('request', { export: exportId, snapshot: snapshotId, outcome: 'refused', reason });
    return {
      exportId,
      snapshotId,
      generatedTime,
      outcome: 'refused',
      pagesLanded: row.partsLanded,
      recordsLanded: 0,
      reason,
    };
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

interface PageTarget {
  readonly blobName: string;
  readonly metadata: Record<string, string>;
  /** Whether the snapshot row still waits for this page (no other reader has moved past it). */
  readonly expectsPage: () => Promise<boolean>;
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
  target: PageTarget,
  options: { abortSignal?: AbortSignal },
): Promise<LandedPage> {
  let cleanEndings = 0;
  for (let attempt = 1; ; attempt++) {
    try {
      return { ...(await landPage(runtime, endpoint, url, target, options)), attempts: attempt };
    } catch (error) {
      if (cleanTruncations.has(error as Error)) cleanEndings++;
      // Only a body that broke off is asked for again here: the client has already retried the request itself.
      if (cleanEndings >= PAGE_ATTEMPTS) {
        // The same page cut short with a clean end of the response every time: a malformed page, not a dropped
        // connection. Resuming at it would ask for it on every tick, for good.
        throw refused(
          new MdvmError(
            'invalid-input',
            `${endpoint.path}: the page's JSON ended early ${PAGE_ATTEMPTS} times although the response ended cleanly: a malformed page (${errorMessage(error)})`,
          ),
        );
      }
      if (!brokenBodies.has(error as Error) || attempt >= PAGE_ATTEMPTS || options.abortSignal?.aborted) {
        throw error instanceof MdvmError
          ? error
          : new MdvmError('transient', `${endpoint.path}: ${errorMessage(error)}`, { cause: error });
      }
    }
  }
}

/**
 * One page: a page blob this read already wrote is adopted as it is; otherwise GET (with the client's budget and
 * retries) → records as JSON Lines → gzip → staged blocks → commit, create-only, with its MD5 and what the page said
 * (records, nextLink, newest event) → read back: the blob must have the length and MD5 that went in.
 */
async function landPage(
  runtime: Runtime,
  endpoint: Endpoint,
  url: URL,
  target: PageTarget,
  options: { abortSignal?: AbortSignal },
): Promise<Omit<LandedPage, 'attempts'>> {
  const { blobName } = target;
  const started = Date.now();
  const blob = runtime.landing.getBlockBlobClient(blobName);
  const readPage = () =>
    blob.getProperties({ abortSignal: options.abortSignal }).then(
      (props) => props,
      (error: unknown) => {
        if (isStorageCondition(error, 'not-found')) return undefined;
        throw classifyStorageError(error, 'read a page blob');
      },
    );
  // A page is written once. One that is there already (another reader's, or this read's before a crash) is the page:
  // a reader that overlapped must never replace it with bytes read later, which may differ and link elsewhere.
  const before = await readPage();
  if (before) {
    const adopted = adoptedPage(before, target.metadata, started);
    if (adopted) return adopted;
    // Not a page of this read (left by a version without page metadata, or foreign): replace exactly that version,
    // and only while the row still waits for this page. A reader of an older version may have landed it and moved
    // the row on with the nextLink it read there; replacing it now would put other bytes under that link.
    if (!(await target.expectsPage())) throw lostTo(blobName, undefined);
    await blob.delete({ conditions: { ifMatch: before.etag }, abortSignal: options.abortSignal }).catch((error) => {
      if (isStorageCondition(error, 'not-found', 'precondition-failed')) throw lostTo(blobName, error);
      throw classifyStorageError(error, 'replace a foreign page blob');
    });
  }
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
  const sink = new BlockUploadSink(blob, {
    blockBytes: runtime.config.copy.streamBufferBytes,
    blocks: runtime.config.copy.streamBuffers,
    ...(options.abortSignal ? { abortSignal: options.abortSignal } : {}),
  });
  try {
    await pipeline(body, records, createGzip(), sink);
  } catch (error) {
    body.destroy();
    const network = isNetworkError(error) || /terminated|aborted|closed|socket/i.test(errorMessage(error));
    const truncated = error instanceof MdvmError && /truncated/.test(error.message);
    if (truncated || network) {
      const broken = new MdvmError('transient', `${endpoint.path}: the page broke off: ${errorMessage(error)}`, {
        cause: error,
      });
      brokenBodies.add(broken);
      if (truncated && !network) cleanTruncations.add(broken);
      throw broken;
    }
    if (error instanceof MdvmError) throw error;
    throw classifyStorageError(error, 'land a page');
  }
  const nextLink = records.nextLink;
  const problem = nextLink ? nextLinkProblem(nextLink, runtime, endpoint, url) : undefined;
  // Refused before the commit: a link that carries a credential or leads off the endpoint is never stored.
  if (problem) throw refused(new MdvmError('invalid-input', `${endpoint.path}: ${problem}`));
  let committed: { md5: string; bytes: number };
  try {
    committed = await sink.commit({
      contentType: 'application/gzip',
      metadata: {
        ...target.metadata,
        [PAGE_RECORDS_KEY]: String(records.records),
        ...(nextLink ? { [PAGE_NEXT_LINK_KEY]: nextLink } : {}),
        ...(newestEvent ? { [PAGE_NEWEST_EVENT_KEY]: newestEvent } : {}),
      },
      conditions: { ifNoneMatch: '*' },
    });
  } catch (error) {
    if (!isStorageCondition(error, 'precondition-failed', 'already-exists', 'conflict')) throw error;
    // Another reader committed this page meanwhile: its page is the page.
    const theirs = await readPage();
    const adopted = theirs ? adoptedPage(theirs, target.metadata, started) : undefined;
    if (adopted) return adopted;
    throw lostTo(blobName, error);
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
    nextLink,
    newestEvent,
    durationMs: Date.now() - started,
  };
}

function lostTo(blobName: string, cause: unknown): MdvmError {
  const lost = new MdvmError('transient', `${blobName}: another reader is landing this page; this one stops`, {
    cause,
  });
  overlapping.add(lost);
  return lost;
}

/** The landed page a blob holds, when it is a page of this read (its metadata names the same source page). */
function adoptedPage(
  props: { contentLength?: number; contentMD5?: Uint8Array; metadata?: Record<string, string> },
  expected: Record<string, string>,
  started: number,
): Omit<LandedPage, 'attempts'> | undefined {
  const metadata = props.metadata ?? {};
  const records = metadata[PAGE_RECORDS_KEY];
  if (records === undefined || !/^\d{1,12}$/.test(records)) return undefined;
  const sameSource = ['mdvm_export', 'mdvm_generated_time', 'mdvm_source_path'].every(
    (key) => metadata[key] === expected[key],
  );
  if (!sameSource || props.contentLength === undefined || !props.contentMD5) return undefined;
  return {
    bytes: props.contentLength,
    md5: Buffer.from(props.contentMD5).toString('base64'),
    records: Number(records),
    nextLink: metadata[PAGE_NEXT_LINK_KEY] || undefined,
    newestEvent: metadata[PAGE_NEWEST_EVENT_KEY] || undefined,
    durationMs: Date.now() - started,
  };
}

/**
 * Why a page's nextLink must not be followed, or undefined. It must stay on the endpoint being read (another
 * endpoint on the same host would put another export's records in this manifest), carry no credential, fit the
 * blob's metadata and not point at the page it came from.
 */
function nextLinkProblem(next: string, runtime: Runtime, endpoint: Endpoint, current: URL): string | undefined {
  if (carriesCredential(next)) return "the next page's link carries a credential; it is neither stored nor followed";
  if (next.length > MAX_NEXT_LINK_CHARS || /[^\x21-\x7e]/.test(next)) {
    return `the next page's link is not a plain URL of at most ${MAX_NEXT_LINK_CHARS} characters`;
  }
  let url: URL;
  try {
    url = new URL(next);
  } catch {
    return "the next page's link is not an absolute URL";
  }
  const expectedPath = new URL(`${runtime.config.defender.baseUrl}${endpoint.path}`).pathname;
  if (url.pathname.toLowerCase() !== expectedPath.toLowerCase()) {
    return `the next page's link leaves ${endpoint.path} (it points at ${url.pathname.slice(0, 200)})`;
  }
  if (url.href === current.href) return "the next page's link is this page's own link (a loop)";
  return undefined;
}

/**
 * The rows of a read that found nothing, removed under their ETags. A reader that overlapped may touch the row
 * meanwhile (its lastError): read again and retry while the row still says the read is done and found nothing.
 */
async function forgetEmptyRead(runtime: Runtime, exportId: string, generatedTime: string): Promise<void> {
  for (let attempt = 1; ; attempt++) {
    const current = await runtime.store.getSnapshot(exportId, generatedTime);
    if (!current || current.value.cursor || (current.value.recordsLanded ?? 0) > 0) return;
    try {
      await runtime.store.forgetRead(current);
      return;
    } catch (error) {
      if (!(error instanceof ConcurrentUpdateError) || attempt >= 5) {
        throw new MdvmError(
          'transient',
          `${exportId} ${current.value.snapshotId}: could not remove the rows of a read that found nothing (${errorMessage(error)}); the next tick tries again`,
          { cause: error },
        );
      }
    }
  }
}

/** Two readers that adopt the same page write the same row; the one that loses the race stops. */
async function upsertLandedPart(runtime: Runtime, row: PartRow): Promise<void> {
  try {
    const existing = await runtime.store.getPart(row.exportId, row.snapshotId, row.path);
    if (existing) await runtime.store.updatePart(existing, row);
    else await runtime.store.insertParts([row]);
  } catch (error) {
    if (!(error instanceof ConcurrentUpdateError) && !isStorageCondition(error, 'already-exists', 'conflict')) {
      throw error;
    }
    throw lostTo(row.landingPath, error);
  }
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
    // Defender's times are UTC; one without a zone read as local time would move the watermark by the zone offset.
    const utc = /(Z|[+-]\d\d:?\d\d)$/i.test(text) ? text : `${text}Z`;
    return Number.isNaN(Date.parse(utc)) ? undefined : new Date(utc).toISOString();
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

function earlierOf(a: string, b: string): string {
  return compareGeneratedTime(a, b) <= 0 ? a : b;
}

function laterOf(a: string, b: string): string {
  if (!a) return b;
  return compareGeneratedTime(a, b) >= 0 ? a : b;
}
