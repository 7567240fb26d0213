import type { ExportId } from './catalog.js';
import { settleSnapshotFromRows } from './completion.js';
import { TrailingRuns } from './concurrency.js';
import { errorMessage, MdvmError } from './errors.js';
import { ConcurrentUpdateError, type PartRow } from './manifestStore.js';
import { boundedDeadLetter, encodeDeadLetter, type PartMessage, parsePartMessage, safeStringify } from './messages.js';
import { annotate, inSpan, linkFrom, record, SPAN_NAMES } from './observability.js';
import { canonicalGeneratedTime, landingPath, parseSourceUrl, snapshotIdOf } from './parts.js';
import { redact } from './redact.js';
import type { Runtime } from './runtime.js';
import type { Telemetry } from './telemetry.js';

/** Must equal host.json `extensions.queues.maxDequeueCount` (a test keeps them together). */
export const MAX_DEQUEUE_COUNT = 5;

export type LandOutcome = 'landed' | 'duplicate' | 'expired' | 'failed' | 'dead-lettered' | 'superseded';

export interface LandResult {
  readonly outcome: LandOutcome;
  readonly reason?: string;
  readonly bytes?: number;
  readonly method?: string;
}

export interface Delivery {
  /** How many times the queue has delivered this message, this time included. */
  readonly dequeueCount: number;
  /** Stops the copy (the in-process host at `run --timeout-s`); nothing is recorded, as for a crashed delivery. */
  readonly abortSignal?: AbortSignal;
}

/**
 * Handle one parts-queue message. Returns normally for every outcome that retrying cannot
 * change (landed, duplicate, expired, failed, dead-lettered); throws only for transient trouble,
 * so the queue redelivers, and after MAX_DEQUEUE_COUNT attempts the host parks it on the poison queue.
 */
export function landPart(
  runtime: Runtime,
  telemetry: Telemetry,
  rawMessage: unknown,
  delivery: Delivery,
): Promise<LandResult> {
  const claimed = (typeof rawMessage === 'object' && rawMessage !== null ? rawMessage : {}) as Record<string, unknown>;
  const text = (key: string) => (typeof claimed[key] === 'string' ? (claimed[key] as string).slice(0, 300) : undefined);
  // One span per delivery, linked to the tick that enqueued the message (W3C trace context in the message).
  return inSpan(
    SPAN_NAMES.copy,
    { export: text('export'), snapshot: text('snapshot'), part: text('part'), attempt: delivery.dequeueCount },
    async (span) => {
      try {
        const result = await landOnePart(runtime, telemetry, rawMessage, delivery);
        annotate(span, {
          outcome: result.outcome,
          ...(result.bytes === undefined ? {} : { bytes: result.bytes }),
          ...(result.method ? { method: result.method } : {}),
        });
        record.partOutcome(text('export') ?? 'unknown', result.outcome);
        return result;
      } catch (error) {
        if (delivery.abortSignal?.aborted) {
          annotate(span, { outcome: 'stopped' });
          throw error;
        }
        const kind = error instanceof MdvmError ? error.kind : 'transient';
        // After the last allowed delivery throws, the host moves the message to the poison queue.
        const outcome = delivery.dequeueCount >= MAX_DEQUEUE_COUNT ? 'dead-lettered' : 'retry';
        annotate(span, { outcome, 'error.class': kind });
        record.failure(text('export'), kind);
        if (outcome === 'dead-lettered') record.partOutcome(text('export') ?? 'unknown', outcome);
        throw error;
      }
    },
    { links: linkFrom(text('traceparent')) },
  );
}

/**
 * A part message as the copier takes it, checked before any table is read: the v1 schema, the source URL policy, a
 * part that is the URL's path, and a canonical generatedTime with its snapshot id. Throws `invalid-input`.
 * `mdvm-ingest requeue` checks a poisoned message with the same function.
 */
export function parseCheckedPartMessage(
  rawMessage: unknown,
  config: Runtime['config'],
): { message: PartMessage; sourcePath: string } {
  const message = parsePartMessage(rawMessage);
  const source = parseSourceUrl(message.sourceUrl, config);
  if (source.relativePath !== message.part) {
    throw new MdvmError('invalid-input', `part '${message.part}' does not match the source URL's path`);
  }
  // One spelling per instant: the table key, the folder and the superseded check all use the canonical one.
  if (canonicalGeneratedTime(message.generatedTime) !== message.generatedTime) {
    throw new MdvmError(
      'invalid-input',
      `generatedTime '${message.generatedTime}' is not canonical ('${canonicalGeneratedTime(message.generatedTime)}')`,
    );
  }
  if (snapshotIdOf(message.generatedTime) !== message.snapshot) {
    throw new MdvmError('invalid-input', `snapshot '${message.snapshot}' does not match generatedTime`);
  }
  return { message, sourcePath: source.sourcePath };
}

/**
 * Why a message may not copy into this part row, or undefined. The message is bound to what the timer recorded from
 * Defender: it cannot choose its own source, even another account with the same part path that the allowlist admits;
 * and the row is bound to the one landing name its keys give.
 */
export function bindingProblem(sourcePath: string, row: PartRow): string | undefined {
  if (sourcePath !== row.sourcePath) {
    return `the message's source (${sourcePath}) is not the source recorded for ${row.exportId} ${row.snapshotId} ${row.path} (${row.sourcePath})`;
  }
  // The destination is derived, never taken on trust from a row: an edited row must not aim a copy (and its
  // replacement of a blob that is not this part) at another snapshot's part, a manifest or _latest.json.
  const expected = landingPath(row.exportId, row.snapshotId, row.path);
  if (row.landingPath !== expected) {
    return `the part row's landingPath (${row.landingPath}) is not where ${row.exportId} ${row.snapshotId} ${row.path} lands (${expected}); the row was changed by hand`;
  }
  return undefined;
}

/** Two versions of a part row describe the same copy: the same source and the same landing name. */
function sameBinding(a: PartRow, b: PartRow): boolean {
  return a.sourcePath === b.sourcePath && a.landingPath === b.landingPath;
}

async function landOnePart(
  runtime: Runtime,
  telemetry: Telemetry,
  rawMessage: unknown,
  delivery: Delivery,
): Promise<LandResult> {
  let message: PartMessage;
  let sourcePath: string;
  try {
    ({ message, sourcePath } = parseCheckedPartMessage(rawMessage, runtime.config));
  } catch (error) {
    return deadLetter(runtime, telemetry, rawMessage, errorMessage(error));
  }

  const { export: exportId, snapshot: snapshotId, part } = message;
  const base = { export: exportId, snapshot: snapshotId, part };
  const row = await runtime.store.getPart(exportId, snapshotId, part);
  if (!row) {
    // Only parts the timer recorded are ever copied: a well-formed but unknown message is refused.
    return deadLetter(runtime, telemetry, rawMessage, `no part row for ${exportId} ${snapshotId} ${part}`);
  }
  const unbound = bindingProblem(sourcePath, row.value);
  if (unbound) return deadLetter(runtime, telemetry, rawMessage, unbound);
  if (row.value.status === 'landed') {
    telemetry.track('part', { ...base, outcome: 'duplicate' });
    // The delivery that landed it may have died before its completion check: check again, it is one read.
    await settleSnapshot(runtime, telemetry, exportId, snapshotId, message.generatedTime);
    return { outcome: 'duplicate' };
  }
  const supersededBy = await runtime.store.supersededBy(exportId, message.generatedTime);
  if (supersededBy !== undefined) {
    telemetry.track('part', { ...base, outcome: 'superseded' });
    return { outcome: 'superseded', reason: `snapshot superseded by ${supersededBy}` };
  }

  const now = runtime.now().getTime();
  if (message.sasExpiresOn && Date.parse(message.sasExpiresOn) - runtime.config.sasSafetyMarginInMs <= now) {
    return markUnlandable(
      runtime,
      telemetry,
      message,
      'expired',
      'SAS expired before the copy started; the next timer tick resumes with a fresh URL',
    );
  }

  // Copy attempts started, written with the outcome (no write before the copy): a crashed attempt still counts,
  // because its redelivery's dequeue count is higher.
  const attempted = (r: { attempts: number }) => Math.max(r.attempts + 1, delivery.dequeueCount);
  const started = Date.now();
  let copied: Awaited<ReturnType<Runtime['copier']['copy']>>;
  try {
    copied = await runtime.copier.copy({
      sourceUrl: message.sourceUrl,
      landingPath: row.value.landingPath,
      metadata: {
        mdvm_export: exportId,
        mdvm_generated_time: message.generatedTime,
        mdvm_source_path: row.value.sourcePath,
      },
      ...(delivery.abortSignal ? { abortSignal: delivery.abortSignal } : {}),
      // Read again just before: a blob is never replaced for a part that landed, or was re-bound, since the read above.
      mayReplaceForeignBlob: async () => {
        const now = (await runtime.store.getPart(exportId, snapshotId, part))?.value;
        return now !== undefined && now.status !== 'landed' && sameBinding(now, row.value);
      },
    });
  } catch (error) {
    if (delivery.abortSignal?.aborted) {
      // Stopped, not failed: like a crash, nothing is recorded (the redelivery's dequeue count counts this attempt).
      throw new MdvmError('transient', `copy of ${part} stopped before it finished: ${errorMessage(error)}`, {
        cause: error,
      });
    }
    const failure =
      error instanceof MdvmError ? error : new MdvmError('transient', errorMessage(error), { cause: error });
    if (failure.kind === 'expired') {
      return markUnlandable(runtime, telemetry, message, 'expired', failure.message, attempted);
    }
    if (failure.kind === 'not-found' || failure.kind === 'invalid-input') {
      return markUnlandable(runtime, telemetry, message, 'failed', failure.message, attempted);
    }
    const lastAttempt = delivery.dequeueCount >= MAX_DEQUEUE_COUNT;
    await runtime.store.mutatePart(exportId, snapshotId, part, (r) =>
      r.status === 'landed'
        ? undefined
        : { attempts: attempted(r), lastError: failure.message, ...(lastAttempt ? { status: 'failed' } : {}) },
    );
    if (lastAttempt) {
      // The snapshot says which part stopped it, as for a part that can never land (markUnlandable).
      await runtime.store.mutateSnapshot(exportId, message.generatedTime, (s) =>
        s.status === 'complete'
          ? undefined
          : { lastError: redact(`${part}: out of attempts (${MAX_DEQUEUE_COUNT}): ${failure.message}`) },
      );
      await settleSnapshot(runtime, telemetry, exportId, snapshotId, message.generatedTime);
    }
    telemetry.track('part', {
      ...base,
      outcome: lastAttempt ? 'failed' : 'retry',
      reason: failure.message,
      durationMs: Date.now() - started,
    });
    throw failure;
  }

  // Exactly one delivery flips the row to landed. The row read before the copy is usually unchanged since, so the
  // flip is one conditional write with its ETag; only if someone else wrote it meanwhile is it read again.
  const landedChanges = {
    status: 'landed' as const,
    attempts: attempted(row.value),
    bytes: copied.bytes,
    md5: copied.md5,
    records: copied.records,
    copyMethod: copied.method,
    verification: copied.verification,
    durationMs: Date.now() - started,
    landedAt: runtime.now().toISOString(),
    lastError: '',
  };
  let flipped = true;
  let rebound = false;
  try {
    await runtime.store.updatePart(row, landedChanges);
  } catch (error) {
    if (!(error instanceof ConcurrentUpdateError)) throw error;
    flipped =
      (await runtime.store.mutatePart(exportId, snapshotId, part, (r) => {
        if (r.status === 'landed') return undefined;
        // Landed means landed from the source the row names now: a tick that re-bound the part meanwhile has sent a
        // message for the new source, and this copy (of the old one) is left for that delivery to replace.
        rebound = !sameBinding(r, row.value);
        return rebound ? undefined : { ...landedChanges, attempts: attempted(r) };
      })) !== undefined;
  }
  if (rebound) {
    const reason = 'the part was bound to another source while this copy ran; the newer message lands it';
    telemetry.track('part', { ...base, outcome: 'superseded', reason });
    return { outcome: 'superseded', reason };
  }
  if (!flipped) {
    telemetry.track('part', { ...base, outcome: 'duplicate' });
    // Someone flipped it first, and that may have been this very delivery: a flip whose response was lost and
    // whose retry met its own new ETag. Then no other delivery knows to check, so this one does.
    await settleSnapshot(runtime, telemetry, exportId, snapshotId, message.generatedTime);
    return { outcome: 'duplicate' };
  }
  telemetry.track('part', {
    ...base,
    outcome: 'landed',
    bytes: copied.bytes,
    ...(copied.records === undefined ? {} : { records: copied.records }),
    durationMs: Date.now() - started,
    method: copied.method,
  });
  // No shared counter to bump (docs/adr/0005): every landing asks the parts table whether anything is left.
  // The flip above is committed before this read, so of two parts landing at once at least the later one sees
  // none left; completion itself is safe to run twice.
  record.landed(exportId, copied.bytes, Date.now() - started, copied.method);
  await settleSnapshot(runtime, telemetry, exportId, snapshotId, message.generatedTime);
  return { outcome: 'landed', bytes: copied.bytes, method: copied.method };
}

/** After a part settles: settleSnapshotFromRows, one check at a time per snapshot in this process. */
function settleSnapshot(
  runtime: Runtime,
  telemetry: Telemetry,
  exportId: ExportId,
  snapshotId: string,
  generatedTime: string,
): Promise<void> {
  // Parts landing together in this process share one check that starts after their flips, instead of one query
  // each: exact (every caller waits for a check that sees its own flip), and cheaper the busier it gets.
  let checks = completionChecks.get(runtime.store);
  if (!checks) {
    checks = new TrailingRuns();
    completionChecks.set(runtime.store, checks);
  }
  return checks.run(`${exportId}/${generatedTime}`, async () => {
    await settleSnapshotFromRows(runtime, telemetry, exportId, snapshotId, generatedTime);
  });
}

const completionChecks = new WeakMap<Runtime['store'], TrailingRuns>();

async function markUnlandable(
  runtime: Runtime,
  telemetry: Telemetry,
  message: PartMessage,
  status: 'expired' | 'failed',
  reason: string,
  attempted?: (row: { attempts: number }) => number,
): Promise<LandResult> {
  await runtime.store.mutatePart(message.export, message.snapshot, message.part, (r) =>
    r.status === 'landed'
      ? undefined
      : { status, lastError: redact(reason), ...(attempted ? { attempts: attempted(r) } : {}) },
  );
  await runtime.store.mutateSnapshot(message.export, message.generatedTime, (s) =>
    s.status === 'complete' ? undefined : { lastError: redact(`${message.part}: ${reason}`) },
  );
  await settleSnapshot(runtime, telemetry, message.export, message.snapshot, message.generatedTime);
  telemetry.track('part', {
    export: message.export,
    snapshot: message.snapshot,
    part: message.part,
    outcome: status,
    reason,
  });
  return { outcome: status, reason: redact(reason) };
}

/**
 * A message that can never succeed goes to the poison queue with its reason, SAS removed, and is
 * acknowledged: it is never retried blindly and nothing that landed is touched.
 */
async function deadLetter(
  runtime: Runtime,
  telemetry: Telemetry,
  rawMessage: unknown,
  reason: string,
): Promise<LandResult> {
  const original = typeof rawMessage === 'string' ? rawMessage : safeStringify(rawMessage);
  const letter = boundedDeadLetter(redact(reason), redact(original), runtime.now().toISOString());
  await runtime.poisonQueue.sendMessage(encodeDeadLetter(letter));
  telemetry.track('part', { outcome: 'dead-lettered', reason: letter.reason });
  return { outcome: 'dead-lettered', reason: letter.reason };
}
