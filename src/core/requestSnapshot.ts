import { type ExportId, getExportType } from './catalog.js';
import { completeSnapshotIfReady, reconcileCounters } from './completion.js';
import { runBounded } from './concurrency.js';
import { classifyStorageError, MdvmError } from './errors.js';
import type { PartRow, SnapshotRow, Versioned } from './manifestStore.js';
import { encodeMessage, messageTimeToLiveInSeconds, type PartMessage } from './messages.js';
import { canonicalGeneratedTime, landingPath, parseSourceUrl, type SourcePart, snapshotIdOf } from './parts.js';
import type { Runtime } from './runtime.js';
import type { Telemetry } from './telemetry.js';

export type TickOutcome = 'enqueued' | 'resumed' | 'unchanged' | 'completed';

export interface TickResult {
  readonly exportId: ExportId;
  readonly snapshotId: string;
  readonly generatedTime: string;
  readonly outcome: TickOutcome;
  readonly partCount: number;
  readonly partsEnqueued: number;
  readonly partsLanded: number;
  readonly superseded: readonly string[];
}

interface OfferedPart extends SourcePart {
  readonly url: string;
}

/**
 * One timer tick for one export type: ask Defender for the current snapshot, record it, and
 * enqueue every part that still needs copying (all of them the first time; only the missing ones
 * when resuming). Older incomplete snapshots become `superseded`; nothing landed is deleted.
 */
export async function requestSnapshot(
  runtime: Runtime,
  telemetry: Telemetry,
  exportId: ExportId,
  options: { abortSignal?: AbortSignal } = {},
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
  const offered = uniqueParts(
    response.exportFiles.map((url) => {
      try {
        return { ...parseSourceUrl(url, runtime.config), url };
      } catch (error) {
        throw new MdvmError(
          'invalid-input',
          `Defender returned a part URL the app refuses: ${(error as Error).message}`,
          { cause: error },
        );
      }
    }),
  );

  const now = runtime.now();
  let snapshot = await runtime.store.getSnapshot(exportId, generatedTime);
  const superseded = await supersedeOlder(runtime, telemetry, exportId, generatedTime);
  if (snapshot?.value.status === 'complete') {
    telemetry.track('request', {
      export: exportId,
      snapshot: snapshotId,
      outcome: 'unchanged',
      durationMs: Date.now() - started,
    });
    return result('unchanged', snapshot.value, 0, superseded);
  }
  const resuming = snapshot !== undefined;
  snapshot ??= await runtime.store.createSnapshot({
    exportId,
    generatedTime,
    snapshotId,
    status: 'requested',
    partCount: offered.length,
    partsLanded: 0,
    bytesLanded: 0,
    requestedAt: now.toISOString(),
    lastRequestedAt: now.toISOString(),
  });

  const existing = new Map((await runtime.store.listParts(exportId, snapshotId)).map((r) => [r.value.path, r]));
  // A URL whose SAS is already dead (or dies within the safety margin) is not worth a message.
  const margin = runtime.config.sasSafetyMarginInMs;
  const deadOnArrival = (p: OfferedPart) =>
    p.sasExpiresOn !== undefined && p.sasExpiresOn.getTime() - margin <= now.getTime();
  const deadReason = 'the SAS URL had expired when Defender returned it; the next tick asks for fresh URLs';
  const newRows: PartRow[] = offered
    .filter((p) => !existing.has(p.relativePath))
    .map((p) => ({
      exportId,
      snapshotId,
      path: p.relativePath,
      sourcePath: p.sourcePath,
      landingPath: landingPath(exportId, snapshotId, p.relativePath),
      status: deadOnArrival(p) ? 'expired' : 'queued',
      attempts: 0,
      // A live SAS expiry on a queued row means "its message is on the queue": set once it is.
      sasExpiresOn: deadOnArrival(p) ? p.sasExpiresOn?.toISOString() : undefined,
      queuedAt: now.toISOString(),
      ...(deadOnArrival(p) ? { lastError: deadReason } : {}),
    }));
  await runtime.store.insertParts(newRows);

  const needed = offered.filter((p) => {
    const row = existing.get(p.relativePath);
    return row === undefined || needsAnotherMessage(row, now, margin);
  });
  const toEnqueue = needed.filter((p) => !deadOnArrival(p));
  const expired = needed.filter(deadOnArrival);
  // Rows that get a fresh message are `queued` again with the new SAS expiry; dead ones are `expired`.
  await runBounded(
    needed.filter((p) => existing.has(p.relativePath)),
    runtime.config.enqueueConcurrency,
    (p) =>
      runtime.store.mutatePart(exportId, snapshotId, p.relativePath, (row) =>
        row.status === 'landed'
          ? undefined
          : deadOnArrival(p)
            ? { status: 'expired', sasExpiresOn: p.sasExpiresOn?.toISOString(), lastError: deadReason }
            : { status: 'queued', queuedAt: now.toISOString() },
      ),
  );
  for (const p of expired) {
    telemetry.track('part', {
      export: exportId,
      snapshot: snapshotId,
      part: p.relativePath,
      outcome: 'expired',
      reason: deadReason,
    });
  }

  await runtime.store.mutateSnapshot(exportId, generatedTime, (row) => ({
    status: row.status === 'requested' || (row.status === 'failed' && toEnqueue.length > 0) ? 'copying' : row.status,
    partCount: Math.max(row.partCount, offered.length),
    lastRequestedAt: now.toISOString(),
    ...(expired.length > 0 ? { lastError: `${expired.length} part(s): ${deadReason}` } : {}),
  }));

  await runBounded(toEnqueue, runtime.config.enqueueConcurrency, async (p) => {
    await enqueue(runtime, {
      v: 1,
      export: exportId,
      snapshot: snapshotId,
      generatedTime,
      part: p.relativePath,
      sourceUrl: p.url,
      sasExpiresOn: p.sasExpiresOn?.toISOString() ?? null,
      enqueuedAt: now.toISOString(),
    });
    // Only now is the part in flight; a tick that died before this line leaves it marked as needing a message.
    if (p.sasExpiresOn) {
      await runtime.store.mutatePart(exportId, snapshotId, p.relativePath, (row) =>
        row.status === 'queued' ? { sasExpiresOn: p.sasExpiresOn?.toISOString() } : undefined,
      );
    }
  });

  const landed = [...existing.values()].filter((r) => r.value.status === 'landed').map((r) => r.value);
  const current = (await runtime.store.getSnapshot(exportId, generatedTime))?.value ?? snapshot.value;
  await reconcileCounters(runtime, current, landed);
  const completed = await completeSnapshotIfReady(runtime, telemetry, exportId, generatedTime);
  const outcome: TickOutcome = completed ? 'completed' : resuming ? 'resumed' : 'enqueued';
  telemetry.track('request', {
    export: exportId,
    snapshot: snapshotId,
    outcome: outcome === 'resumed' ? 'resumed' : outcome === 'completed' ? 'completed' : 'enqueued',
    durationMs: Date.now() - started,
    reason: `${toEnqueue.length} of ${offered.length} parts enqueued, ${landed.length} already landed${expired.length ? `, ${expired.length} with an expired SAS` : ''}`,
  });
  return {
    exportId,
    snapshotId,
    generatedTime,
    outcome,
    partCount: offered.length,
    partsEnqueued: toEnqueue.length,
    partsLanded: landed.length,
    superseded,
  };
}

/** A part needs a fresh message when its last one cannot succeed any more. */
function needsAnotherMessage(row: Versioned<PartRow>, now: Date, marginInMs: number): boolean {
  switch (row.value.status) {
    case 'landed':
      return false;
    case 'expired':
    case 'failed':
      return true;
    case 'queued': {
      const expires = row.value.sasExpiresOn ? Date.parse(row.value.sasExpiresOn) : Number.NaN;
      // A queued part whose message still holds a valid SAS is in flight: do not copy it twice.
      return Number.isNaN(expires) || expires - marginInMs <= now.getTime();
    }
  }
}

async function enqueue(runtime: Runtime, message: PartMessage): Promise<void> {
  const ttlSeconds = messageTimeToLiveInSeconds(message, runtime.config.defender.sasValidHours, runtime.now());
  try {
    await runtime.queue.sendMessage(encodeMessage(message), { messageTimeToLive: ttlSeconds });
  } catch (error) {
    throw classifyStorageError(error, `enqueue ${message.part}`);
  }
}

async function supersedeOlder(
  runtime: Runtime,
  telemetry: Telemetry,
  exportId: ExportId,
  generatedTime: string,
): Promise<string[]> {
  const superseded: string[] = [];
  for (const older of await runtime.store.listSnapshots(exportId)) {
    const row = older.value;
    if (row.generatedTime >= generatedTime) continue;
    if (row.status === 'complete' || row.status === 'superseded') continue;
    await runtime.store.mutateSnapshot(exportId, row.generatedTime, (r) =>
      r.status === 'complete' || r.status === 'superseded'
        ? undefined
        : { status: 'superseded', supersededBy: generatedTime },
    );
    superseded.push(row.snapshotId);
    telemetry.track('request', {
      export: exportId,
      snapshot: row.snapshotId,
      outcome: 'superseded',
      reason: `superseded by ${snapshotIdOf(generatedTime)} with ${row.partsLanded}/${row.partCount} parts landed`,
    });
  }
  return superseded;
}

function uniqueParts(parts: OfferedPart[]): OfferedPart[] {
  const seen = new Map<string, OfferedPart>();
  for (const p of parts) if (!seen.has(p.relativePath)) seen.set(p.relativePath, p);
  return [...seen.values()];
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
    superseded,
  };
}
