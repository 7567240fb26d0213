import { type ExportId, getExportType } from './catalog.js';
import { completeSnapshotIfReady, reconcileCounters, rowsCoverSnapshot, settleSnapshotFromRows } from './completion.js';
import { runBounded } from './concurrency.js';
import { classifyStorageError, errorMessage, MdvmError } from './errors.js';
import type { PartRow, SnapshotRow } from './manifestStore.js';
import { encodeMessage, MAX_SOURCE_URL_LENGTH, messageTimeToLiveInSeconds, type PartMessage } from './messages.js';
import { annotate, inSpan, SPAN_NAMES, traceparentOf } from './observability.js';
import {
  canonicalGeneratedTime,
  exportFolderOf,
  manifestPath,
  namesTooLong,
  parseSourceUrl,
  type SourcePart,
  snapshotIdOf,
} from './parts.js';
import { stripQuery } from './redact.js';
import type { Runtime } from './runtime.js';
import type { Telemetry } from './telemetry.js';
import {
  DEAD_ON_ARRIVAL_REASON,
  needsAnotherMessage,
  type OfferedPart,
  planTick,
  statusAfterTick,
} from './tickPlan.js';

/** How far ahead of this clock a generatedTime may be (clock skew between Defender and us), and no further. */
export const MAX_CLOCK_SKEW_IN_MS = 10 * 60_000;

/** The lastError a tick writes while files are refused (cleared once Defender lists none). */
const REFUSED_NOTE = /^\d+ of \d+ file\(s\) refused, so the snapshot cannot complete/;

/** Part rows per table transaction, for new rows and for in-flight marks; sends run at most two marks ahead. */
const ENQUEUE_CHUNK = 100;

export type TickOutcome = 'enqueued' | 'resumed' | 'unchanged' | 'completed' | 'empty';

export interface TickResult {
  readonly exportId: ExportId;
  readonly snapshotId: string;
  readonly generatedTime: string;
  readonly outcome: TickOutcome;
  readonly partCount: number;
  readonly partsEnqueued: number;
  readonly partsLanded: number;
  /** Parts whose offered SAS was already dead (marked expired; the next tick asks for fresh URLs). */
  readonly partsExpired: number;
  /** Files of Defender's list the tick refused (ADR 0007). */
  readonly partsRefused: number;
  readonly superseded: readonly string[];
}

/**
 * One timer tick for one export type: ask Defender for the current snapshot, plan what to record and enqueue
 * (tickPlan.ts: all parts the first time, only the missing ones when resuming, older incomplete snapshots
 * superseded, dead SAS URLs marked expired), and carry the plan out. Nothing landed is deleted.
 */
export function requestSnapshot(
  runtime: Runtime,
  telemetry: Telemetry,
  exportId: ExportId,
  options: { abortSignal?: AbortSignal } = {},
): Promise<TickResult> {
  // One span per tick; every message it sends carries the span's trace context, so each copy links back to it.
  return inSpan(SPAN_NAMES.tick, { export: exportId }, async (span) => {
    const result = await tick(runtime, telemetry, exportId, { ...options, traceparent: traceparentOf(span) });
    annotate(span, {
      snapshot: result.snapshotId,
      outcome: result.outcome,
      'parts.offered': result.partCount,
      'parts.enqueued': result.partsEnqueued,
      'parts.landed': result.partsLanded,
      'parts.expired': result.partsExpired,
      'parts.refused': result.partsRefused,
    });
    return result;
  });
}

async function tick(
  runtime: Runtime,
  telemetry: Telemetry,
  exportId: ExportId,
  options: { abortSignal?: AbortSignal; traceparent?: string | undefined },
): Promise<TickResult> {
  const type = getExportType(exportId);
  const started = Date.now();
  const response = await runtime.defender.getExportFiles(type, {
    sasValidHours: runtime.config.defender.sasValidHours,
    ...(options.abortSignal ? { abortSignal: options.abortSignal } : {}),
    onRetry: ({ statusCode, waitInMs }) =>
      telemetry.track('defender-retry', {
        export: exportId,
        outcome: statusCode === 429 ? 'rate-limited' : 'retry',
        durationMs: waitInMs,
        reason: `HTTP ${statusCode ?? 'network error'}`,
      }),
  });
  const generatedTime = canonicalGeneratedTime(response.generatedTime);
  const snapshotId = snapshotIdOf(generatedTime);
  const aheadInMs = Date.parse(generatedTime) - runtime.now().getTime();
  if (aheadInMs > MAX_CLOCK_SKEW_IN_MS) {
    // A snapshot from the future would sort after every real one and pin _latest.json for good.
    throw new MdvmError(
      'invalid-input',
      `Defender's generatedTime ${generatedTime} is ${Math.round(aheadInMs / 60_000)} minutes ahead of this clock (${runtime.now().toISOString()}); nothing recorded`,
    );
  }
  if (response.exportFiles.length > runtime.config.maxPartsPerSnapshot) {
    throw new MdvmError(
      'invalid-input',
      `Defender listed ${response.exportFiles.length} files for ${exportId} ${snapshotId}, more than MDVM_MAX_PARTS_PER_SNAPSHOT (${runtime.config.maxPartsPerSnapshot}); nothing recorded`,
    );
  }
  if (response.exportFiles.length === 0) {
    // Nothing to land is not a snapshot: recording it would complete it empty and move _latest.json to it.
    telemetry.track('request', {
      export: exportId,
      snapshot: snapshotId,
      outcome: 'empty',
      durationMs: Date.now() - started,
      reason: 'Defender listed no files; nothing recorded, the next tick asks again',
    });
    return {
      exportId,
      snapshotId,
      generatedTime,
      outcome: 'empty',
      partCount: 0,
      partsEnqueued: 0,
      partsLanded: 0,
      partsExpired: 0,
      partsRefused: 0,
      superseded: [],
    };
  }
  const { offered, refused, warnings } = screenFiles(
    runtime,
    exportId,
    generatedTime,
    snapshotId,
    response.exportFiles,
  );
  for (const r of refused) {
    telemetry.track('part', {
      export: exportId,
      snapshot: snapshotId,
      part: r.part,
      outcome: 'refused',
      reason: r.reason,
    });
  }
  const refusedNote =
    refused.length > 0
      ? `${refused.length} of ${response.exportFiles.length} file(s) refused, so the snapshot cannot complete: ${refused[0]?.reason}`
      : warnings.length > 0
        ? `${warnings.length} file(s) ${warnings[0]?.reason}`
        : undefined;

  const now = runtime.now();
  const current = await runtime.store.getSnapshot(exportId, generatedTime);
  if (offered.length === 0 && !current) {
    // As an empty list: a new snapshot of nothing but refused files would supersede the one in progress, and could
    // never complete itself. (A snapshot already recorded keeps its rows; the refusals are written to it below.)
    throw new MdvmError(
      'invalid-input',
      `Defender listed ${response.exportFiles.length} file(s) for ${exportId} ${snapshotId} and every one was refused (${refused[0]?.reason ?? ''}); nothing recorded`,
    );
  }

  const recorded = current ? (await runtime.store.listParts(exportId, snapshotId)).map((r) => r.value) : [];
  const plan = planTick({
    exportId,
    generatedTime,
    snapshotId,
    offered,
    snapshot: current?.value,
    snapshots: (await runtime.store.listSnapshots(exportId)).map((r) => r.value),
    parts: recorded,
    now,
    sasSafetyMarginInMs: runtime.config.sasSafetyMarginInMs,
  });

  // Carry the plan out, in an order where a crash at any line leaves a state the next tick plans from again.
  // A snapshot with refused files cannot complete: an older one whose every missing part is still in flight goes on
  // (it may complete and move _latest.json); once one of its messages can no longer succeed, it is superseded.
  const stillInFlight =
    refused.length > 0 ? await completableFromQueue(runtime, exportId, plan.supersede, now) : new Set<string>();
  const superseded = await supersede(
    runtime,
    telemetry,
    exportId,
    generatedTime,
    plan.supersede.filter((row) => !stillInFlight.has(row.generatedTime)),
  );
  if (plan.unchanged && current) {
    // Complete, and it stays so, but Defender now lists a file the tick refuses: status says so (the manifest cannot
    // list a file that was never landed).
    if (refused.length !== (current.value.partsRefused ?? 0)) {
      await runtime.store.mutateSnapshot(exportId, generatedTime, (row) =>
        row.status !== 'complete'
          ? undefined
          : {
              partsRefused: refused.length,
              lastError:
                refused.length > 0
                  ? `${refused.length} file(s) listed after completion were refused: ${refused[0]?.reason}`
                  : '',
            },
      );
    }
    telemetry.track('request', {
      export: exportId,
      snapshot: snapshotId,
      outcome: 'unchanged',
      durationMs: Date.now() - started,
    });
    return result('unchanged', current.value, 0, superseded);
  }
  const snapshot = plan.createSnapshot
    ? await runtime.store.createSnapshot({
        ...plan.createSnapshot,
        partCount: plan.createSnapshot.partCount + refused.length,
        ...(refused.length > 0 ? { partsRefused: refused.length } : {}),
        ...(refusedNote ? { lastError: refusedNote } : {}),
      })
    : current;
  if (!snapshot) throw new MdvmError('fatal', `snapshot ${exportId}/${snapshotId} vanished during the tick`);
  // The snapshot row first: its new ETag stops a completion that read the shorter list from marking the snapshot
  // complete (ADR 0013), and its part count keeps any later check from completing before the new rows exist.
  await runtime.store.mutateSnapshot(exportId, generatedTime, (row) => ({
    // Every part recorded, and never fewer (a part once listed stays in the snapshot), plus this list's refused files:
    // a refused file Defender no longer lists stops holding the snapshot back.
    partCount:
      Math.max(row.partCount - (row.partsRefused ?? 0), plan.offered.length, recorded.length + plan.newParts.length) +
      refused.length,
    partsRefused: refused.length,
    ...(refused.length === 0 && (row.partsRefused ?? 0) > 0 && REFUSED_NOTE.test(row.lastError ?? '')
      ? { lastError: '' }
      : {}),
    lastRequestedAt: now.toISOString(),
    ...(plan.expired.length > 0 ? { lastError: `${plan.expired.length} part(s): ${DEAD_ON_ARRIVAL_REASON}` } : {}),
    ...(refusedNote ? { lastError: refusedNote } : {}),
  }));
  const expiredPaths = new Map(plan.markExpired.map((p) => [p.path, p]));
  // From the plan's distinct parts, the ones the messages are made from: the row and its message name one source.
  const offeredSource = new Map(plan.offered.map((p) => [p.relativePath, p.sourcePath]));
  await runBounded([...plan.requeue, ...expiredPaths.keys()], runtime.config.enqueueConcurrency, (path) =>
    runtime.store.mutatePart(exportId, snapshotId, path, (row) => {
      if (row.status === 'landed') return undefined;
      const expired = expiredPaths.get(path);
      // A part not landed yet is bound to where Defender says it is now (the copy checks its message against it).
      const sourcePath = offeredSource.get(path) ?? row.sourcePath;
      return expired
        ? { status: 'expired', sasExpiresOn: expired.sasExpiresOn, lastError: DEAD_ON_ARRIVAL_REASON, sourcePath }
        : // The old expiry goes: until this tick's message is out and marked, the part is not in flight, so a tick
          // that stops before sending it leaves it for the next tick instead of waiting out the old SAS.
          { status: 'queued', queuedAt: now.toISOString(), sourcePath, sasExpiresOn: '' };
    }),
  );
  for (const p of plan.expired) {
    telemetry.track('part', {
      export: exportId,
      snapshot: snapshotId,
      part: p.relativePath,
      outcome: 'expired',
      reason: DEAD_ON_ARRIVAL_REASON,
    });
  }

  // Copying again only once the failed parts are queued again: a check that found them failed and nothing queued
  // before that would mark the snapshot failed once more, under parts that are about to be copied.
  await runtime.store.mutateSnapshot(exportId, generatedTime, (row) => {
    const status = statusAfterTick(row.status, plan.enqueue.length);
    return status === row.status ? undefined : { status };
  });

  // New rows are written while the messages go out, and each message waits for its own row: a copy only ever copies
  // a part the tick recorded. A completion check that meets a partial list of rows finds fewer landed than the
  // snapshot row's partCount, written above, and leaves the snapshot alone.
  const rows = writeRowsInOrder(runtime, plan.newParts);
  let sending: { sent: number; stopped: boolean } | undefined;
  try {
    sending = await sendAndMarkInFlight(
      runtime,
      exportId,
      snapshotId,
      plan.enqueue,
      rows,
      (p) => ({
        v: 1,
        export: exportId,
        snapshot: snapshotId,
        generatedTime,
        part: p.relativePath,
        sourceUrl: p.url,
        sasExpiresOn: p.sasExpiresOn?.toISOString() ?? null,
        enqueuedAt: now.toISOString(),
        ...(options.traceparent ? { traceparent: options.traceparent } : {}),
      }),
      options.abortSignal,
    );
  } finally {
    // A tick that stops leaves the rows not written yet to the next (the sends stopped them already, this is for a
    // throw); one that sent everything also writes the rows no message waits for (dead on arrival) before it returns.
    if (!sending || sending.stopped) rows.stop();
    await rows.settled;
  }
  const rowFailure = rows.failure();
  if (rowFailure !== undefined) throw rowFailure;
  const { sent, stopped } = sending;
  if (stopped) {
    throw new MdvmError(
      'transient',
      `tick stopped after enqueuing ${sent} of ${plan.enqueue.length} parts (interrupted or out of time); the next tick enqueues the rest`,
    );
  }

  const latest = (await runtime.store.getSnapshot(exportId, generatedTime))?.value ?? snapshot.value;
  await reconcileCounters(runtime, latest, [...plan.landed]);
  // As after a landing, now that every row is written: a check that ran while they were (a copy that settled
  // meanwhile) could not tell a stuck snapshot from rows still to come. While a part is still queued this is one small
  // read, not a read of every row (10 for 10,000 parts): that part's own landing checks again.
  const completed =
    latest.status === 'complete'
      ? await completeSnapshotIfReady(runtime, telemetry, exportId, generatedTime)
      : await settleSnapshotFromRows(runtime, telemetry, exportId, snapshotId, generatedTime);
  const outcome: TickOutcome = completed ? 'completed' : current ? 'resumed' : 'enqueued';
  telemetry.track('request', {
    export: exportId,
    snapshot: snapshotId,
    outcome,
    durationMs: Date.now() - started,
    reason: `${plan.enqueue.length} of ${plan.offered.length} parts enqueued, ${plan.landed.length} already landed${plan.expired.length ? `, ${plan.expired.length} with an expired SAS` : ''}`,
  });
  return {
    exportId,
    snapshotId,
    generatedTime,
    outcome,
    partCount: plan.offered.length,
    partsEnqueued: plan.enqueue.length,
    partsLanded: plan.landed.length,
    partsExpired: plan.expired.length,
    partsRefused: refused.length,
    superseded,
  };
}

/** New part rows written in the background while the tick's messages go out (writeRowsInOrder). */
interface RowWriter {
  /** True once the part's row exists (at once for a part an earlier tick recorded), false if `stop()` skipped it;
   *  rejects if its write, or an earlier one, failed. */
  written(path: string): Promise<boolean>;
  /** Writes no transaction after the one under way: the rows left are the next tick's. Not a failure. */
  stop(): void;
  /** Settles, never rejecting, once no transaction is under way or due. */
  readonly settled: Promise<void>;
  /** The first write that failed, if one did. */
  failure(): unknown;
}

/** Writes new part rows ENQUEUE_CHUNK to a transaction, one transaction at a time, starting at once. */
function writeRowsInOrder(runtime: Runtime, rows: readonly PartRow[]): RowWriter {
  const transactionOf = new Map<string, Promise<void>>();
  const skipped = new MdvmError('transient', 'the tick stopped before writing these part rows');
  let stopped = false;
  let failure: unknown;
  let previous = Promise.resolve();
  for (let i = 0; i < rows.length; i += ENQUEUE_CHUNK) {
    const chunk = rows.slice(i, i + ENQUEUE_CHUNK);
    const written = previous.then(() => {
      if (stopped) throw skipped;
      return runtime.store.insertParts(chunk);
    });
    // Handled here, so a transaction no send waits for never becomes an unhandled rejection.
    written.catch((error: unknown) => {
      if (error !== skipped) failure ??= error;
    });
    for (const row of chunk) transactionOf.set(row.path, written);
    previous = written;
  }
  return {
    written: async (path) => {
      try {
        await transactionOf.get(path);
        return true;
      } catch (error) {
        if (error === skipped) return false;
        throw error;
      }
    },
    stop: () => {
      stopped = true;
    },
    settled: previous.then(
      () => undefined,
      () => undefined,
    ),
    failure: () => failure,
  };
}

/**
 * Sends one message per part once `rowWritten` says its row exists, `enqueueConcurrency` at a time with no pause
 * between hundreds, and marks the sent parts in flight in transactions of up to ENQUEUE_CHUNK while the sends go on
 * (one transaction at a time). Until its mark lands, a sent part counts as needing a message: a tick that dies in
 * between makes the next tick send it again, and the copy of a part that already landed is a duplicate that copies
 * nothing. Stops taking parts when `abortSignal` fires, a mark fails or a row could not be written. Whatever was sent
 * is marked before it returns or throws, except after a failed mark: that batch and what was sent after it stay
 * unmarked, for the next tick (after a failed send too, and then the error names both). A URL without an expiry is
 * never marked (such a part gets a message every tick, docs/contracts.md). `stopped`: not every part was sent.
 */
async function sendAndMarkInFlight(
  runtime: Runtime,
  exportId: string,
  snapshotId: string,
  parts: readonly OfferedPart[],
  rows: RowWriter,
  messageOf: (part: OfferedPart) => PartMessage,
  abortSignal: AbortSignal | undefined,
): Promise<{ sent: number; stopped: boolean }> {
  const unmarked: { path: string; sasExpiresOn: string }[] = [];
  let marking: Promise<void> | undefined;
  let markFailure: unknown;
  let unmarkedByFailure = 0;
  let sent = 0;
  let stopped = false;
  const markNext = (evenIfShort: boolean): void => {
    if (marking || markFailure !== undefined || unmarked.length === 0) return;
    if (!evenIfShort && unmarked.length < ENQUEUE_CHUNK) return;
    const batch = unmarked.splice(0, ENQUEUE_CHUNK);
    // Through a promise from the start: a synchronous throw becomes a failed mark, never an unhandled rejection.
    marking = Promise.resolve()
      .then(() => runtime.store.markInFlight(exportId, snapshotId, batch))
      .then(
        () => {
          marking = undefined;
          markNext(false);
        },
        (error: unknown) => {
          markFailure = error;
          unmarkedByFailure = batch.length;
          marking = undefined;
          rows.stop();
        },
      );
  };
  let sendFailure: unknown;
  const stopWriting = (): void => rows.stop();
  abortSignal?.addEventListener('abort', stopWriting, { once: true });
  // A failed mark stops the sends too: the next tick sends whatever is not marked (and writes the rows not written).
  const stopping = () => abortSignal?.aborted === true || markFailure !== undefined;
  try {
    await runBounded(parts, runtime.config.enqueueConcurrency, async (part) => {
      // Sends wait for the marks rather than pile up unmarked parts a crash would send again.
      while (marking && unmarked.length >= 2 * ENQUEUE_CHUNK) await marking;
      // Each message waits for its own row. A row that could not be written stops the sends like a failed send (its
      // error is the tick's); one not written because the tick is stopping stops this part.
      if (stopping() || !(await rows.written(part.relativePath)) || stopping()) {
        stopped = true;
        return;
      }
      await enqueue(runtime, messageOf(part));
      sent++;
      if (part.sasExpiresOn) unmarked.push({ path: part.relativePath, sasExpiresOn: part.sasExpiresOn.toISOString() });
      markNext(false);
    });
  } catch (error) {
    sendFailure = error;
    rows.stop();
  } finally {
    abortSignal?.removeEventListener('abort', stopWriting);
    for (;;) {
      if (marking) await marking;
      else if (markFailure === undefined && unmarked.length > 0) markNext(true);
      else break;
    }
  }
  if (sendFailure !== undefined && markFailure !== undefined) {
    throw sendAndMarkFailed(sendFailure, markFailure, unmarkedByFailure + unmarked.length);
  }
  if (sendFailure !== undefined) throw sendFailure;
  if (markFailure !== undefined) throw markFailure;
  return { sent, stopped };
}

/** A failed send whose clean-up mark failed too: the operator sees both, and that some parts go out twice. */
function sendAndMarkFailed(sendFailure: unknown, markFailure: unknown, unmarkedCount: number): MdvmError {
  const send = classifyStorageError(sendFailure, 'enqueue');
  const mark = classifyStorageError(markFailure, 'mark sent parts in flight');
  return new MdvmError(
    send.kind,
    `${send.message}; then marking ${unmarkedCount} sent part(s) in flight failed too (${mark.message}); the next tick sends them again, and a second delivery of a landed part copies nothing`,
    { cause: sendFailure },
  );
}

async function enqueue(runtime: Runtime, message: PartMessage): Promise<void> {
  const ttlSeconds = messageTimeToLiveInSeconds(message, runtime.config.defender.sasValidHours, runtime.now());
  try {
    await runtime.queue.sendMessage(encodeMessage(message), { messageTimeToLive: ttlSeconds });
  } catch (error) {
    throw classifyStorageError(error, `enqueue ${message.part}`);
  }
}

/**
 * The older snapshots (by generatedTime) whose every part not landed is queued with a message that can still
 * succeed: they may complete from the queue alone. Defender lists only its current snapshot, so no other part of
 * theirs will ever get a new URL.
 */
async function completableFromQueue(
  runtime: Runtime,
  exportId: ExportId,
  older: readonly SnapshotRow[],
  now: Date,
): Promise<Set<string>> {
  const keep = new Set<string>();
  for (const row of older) {
    if ((row.mode ?? 'files') !== 'files' || (row.partsRefused ?? 0) > 0) continue;
    const parts = (await runtime.store.listParts(exportId, row.snapshotId)).map((r) => r.value);
    const inFlight = parts.every(
      (p) => p.status === 'landed' || !needsAnotherMessage(p, now, runtime.config.sasSafetyMarginInMs),
    );
    // A part whose row a failed tick never wrote has no message either: it can only come from a new URL.
    if (parts.length > 0 && inFlight && rowsCoverSnapshot(row, parts.length)) keep.add(row.generatedTime);
  }
  return keep;
}

async function supersede(
  runtime: Runtime,
  telemetry: Telemetry,
  exportId: ExportId,
  generatedTime: string,
  older: readonly SnapshotRow[],
): Promise<string[]> {
  for (const row of older) {
    // Every part may have landed with only the completion left undone (a derive message that could not be sent,
    // _latest.json under a lease): that snapshot is complete, not superseded, and its derived outputs still get built.
    if ((row.mode ?? 'files') === 'files') {
      let failure: unknown;
      const completed = await completeSnapshotIfReady(runtime, telemetry, exportId, row.generatedTime).catch(
        (error: unknown) => {
          failure = error;
          return false;
        },
      );
      if (completed) continue;
      // The completion itself failed (not: parts are missing) after the manifest was written: downstream can already
      // see this snapshot, so it is left for the next tick to complete again rather than superseded. When it cannot
      // be told whether the manifest is there, it is kept too: superseding is the step that cannot be undone.
      if (failure !== undefined) {
        const manifestWritten = await runtime.landing
          .getBlockBlobClient(manifestPath(exportId, row.snapshotId))
          .exists()
          .catch(() => true);
        telemetry.track('request', {
          export: exportId,
          outcome: 'error',
          reason: `${row.snapshotId}: completing it before superseding it failed (${manifestWritten ? 'kept for the next tick: its manifest is written' : 'superseded'}): ${errorMessage(failure)}`,
        });
        if (manifestWritten) continue;
      }
    }
    await runtime.store.mutateSnapshot(exportId, row.generatedTime, (r) =>
      r.status === 'complete' || r.status === 'superseded'
        ? undefined
        : { status: 'superseded', supersededBy: generatedTime },
    );
    telemetry.track('request', {
      export: exportId,
      snapshot: row.snapshotId,
      outcome: 'superseded',
      reason: `superseded by ${snapshotIdOf(generatedTime)} with ${row.partsLanded}/${row.partCount} parts landed`,
    });
  }
  return older.map((row) => row.snapshotId);
}

function result(outcome: TickOutcome, row: SnapshotRow, enqueued: number, superseded: string[]): TickResult {
  return {
    exportId: row.exportId as ExportId,
    snapshotId: row.snapshotId,
    generatedTime: row.generatedTime,
    outcome,
    partCount: row.partCount,
    partsEnqueued: enqueued,
    partsLanded: row.partsLanded,
    partsExpired: 0,
    partsRefused: row.partsRefused ?? 0,
    superseded,
  };
}

/**
 * Sort Defender's file list into parts to record and files to refuse, each refusal with its reason: a file that
 * breaks the URL policy, belongs to another export type, or whose names do not fit Azure's limits. One bad file
 * never stops the good ones; the snapshot it belongs to cannot complete while it is refused. A URL whose date
 * folder disagrees with generatedTime is recorded and reported (Defender's own docs show one such example).
 */
function screenFiles(
  runtime: Runtime,
  exportId: ExportId,
  generatedTime: string,
  snapshotId: string,
  urls: readonly string[],
): {
  offered: OfferedPart[];
  refused: { part: string; reason: string }[];
  warnings: { part: string; reason: string }[];
} {
  const type = getExportType(exportId);
  const folder = exportFolderOf(generatedTime);
  const offered: OfferedPart[] = [];
  const refused: { part: string; reason: string }[] = [];
  const warnings: { part: string; reason: string }[] = [];
  // Defender signs for at most the type's documented hours: a later `se` is not believed, since a queued part counts
  // as in flight, and its message lives, until its SAS expires.
  const latestExpiryInMs = runtime.now().getTime() + type.sasMaxHours * 3_600_000 + MAX_CLOCK_SKEW_IN_MS;
  for (const url of urls) {
    if (url.length > MAX_SOURCE_URL_LENGTH) {
      refused.push({
        part: stripQuery(url).slice(-200),
        reason: `refused: its URL is ${url.length} characters, and a part message carries at most ${MAX_SOURCE_URL_LENGTH}`,
      });
      continue;
    }
    let part: SourcePart;
    try {
      part = parseSourceUrl(url, runtime.config);
    } catch (error) {
      refused.push({ part: stripQuery(url).slice(-200), reason: `refused: ${errorMessage(error)}` });
      continue;
    }
    if (part.sasExpiresOn && part.sasExpiresOn.getTime() > latestExpiryInMs) {
      part = { ...part, sasExpiresOn: new Date(latestExpiryInMs) };
    }
    if (part.blobExportName !== type.blobExportName) {
      refused.push({
        part: part.relativePath,
        reason: `refused: the file belongs to export ${part.blobExportName}, not ${type.blobExportName} (${exportId})`,
      });
      continue;
    }
    const tooLong = namesTooLong(exportId, snapshotId, part.relativePath);
    if (tooLong) {
      refused.push({ part: part.relativePath.slice(0, 200), reason: `refused: ${tooLong}` });
      continue;
    }
    if (part.exportFolder !== folder) {
      warnings.push({
        part: part.relativePath,
        reason: `recorded, but its URL's folder ${part.exportFolder} disagrees with generatedTime ${generatedTime} (${folder})`,
      });
    }
    offered.push({ ...part, url });
  }
  return { offered, refused, warnings };
}
