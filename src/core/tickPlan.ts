import type { ExportId } from './catalog.js';
import type { PartRow, SnapshotRow, SnapshotStatus } from './manifestStore.js';
import { compareGeneratedTime, landingPath, type SourcePart } from './parts.js';

/**
 * The timer tick's decisions, with no I/O: from what Defender offers, what the tables hold and the clock, which
 * rows to create, which parts get a message, which are marked expired and which older snapshots are superseded.
 * requestSnapshot.ts reads the inputs, calls planTick and carries the plan out in order.
 */
export interface OfferedPart extends SourcePart {
  /** The SAS URL: goes into the queue message only, never into a row, a log line or telemetry. */
  readonly url: string;
}

export interface TickInputs {
  readonly exportId: ExportId;
  readonly generatedTime: string;
  readonly snapshotId: string;
  /** The parts Defender listed for this snapshot, in its order (duplicates allowed). */
  readonly offered: readonly OfferedPart[];
  /** This snapshot's row, if an earlier tick recorded it. */
  readonly snapshot: SnapshotRow | undefined;
  /** Every snapshot row of the export (this one included). */
  readonly snapshots: readonly SnapshotRow[];
  /** This snapshot's part rows. */
  readonly parts: readonly PartRow[];
  readonly now: Date;
  /** A SAS that expires within this margin is as good as expired. */
  readonly sasSafetyMarginInMs: number;
}

export interface ExpiredPart {
  readonly path: string;
  readonly sasExpiresOn: string | undefined;
}

export interface TickPlan {
  /** The snapshot is complete: nothing below is done, the tick reports `unchanged`. */
  readonly unchanged: boolean;
  /** Older snapshots (generatedTime) that are neither complete nor superseded: mark them superseded. */
  readonly supersede: readonly SnapshotRow[];
  /** The snapshot row to create, when no tick recorded this snapshot yet. */
  readonly createSnapshot: SnapshotRow | undefined;
  /** Part rows to create: `queued`, or `expired` when the offered SAS is already dead. */
  readonly newParts: readonly PartRow[];
  /** Existing rows (not landed) that get a fresh message: back to `queued`. */
  readonly requeue: readonly string[];
  /** Existing rows (not landed) whose new SAS is dead too: `expired`. */
  readonly markExpired: readonly ExpiredPart[];
  /** The parts to send a message for, each once. */
  readonly enqueue: readonly OfferedPart[];
  /** Every offered part whose SAS is dead, new or existing. */
  readonly expired: readonly OfferedPart[];
  /** Distinct offered parts. */
  readonly offered: readonly OfferedPart[];
  /** Rows already landed (the counters are reconciled against them). */
  readonly landed: readonly PartRow[];
}

export const DEAD_ON_ARRIVAL_REASON =
  'the SAS URL had expired when Defender returned it; the next tick asks for fresh URLs';

export function planTick(inputs: TickInputs): TickPlan {
  const { exportId, generatedTime, snapshotId, now } = inputs;
  const offered = distinctParts(inputs.offered);
  const supersede = inputs.snapshots.filter(
    (row) =>
      compareGeneratedTime(row.generatedTime, generatedTime) < 0 &&
      row.status !== 'complete' &&
      row.status !== 'superseded',
  );
  const landed = inputs.parts.filter((row) => row.status === 'landed');
  const nothing = { newParts: [], requeue: [], markExpired: [], enqueue: [], expired: [] };
  const recorded = new Set(inputs.parts.map((row) => row.path));
  // A complete snapshot is unchanged only while Defender lists no file it has not recorded, and every recorded part
  // is landed; a grown list (or a row a crashed tick left behind) is copied (nothing landed is rewritten) and the
  // snapshot completes again with a manifest that lists every part.
  if (
    inputs.snapshot?.status === 'complete' &&
    offered.every((p) => recorded.has(p.relativePath)) &&
    inputs.parts.every((row) => row.status === 'landed')
  ) {
    return { unchanged: true, supersede, createSnapshot: undefined, ...nothing, offered, landed };
  }

  const isDead = (p: OfferedPart) => isDeadOnArrival(p, now, inputs.sasSafetyMarginInMs);
  const existing = new Map(inputs.parts.map((row) => [row.path, row]));
  const newParts = offered
    .filter((p) => !existing.has(p.relativePath))
    .map((p): PartRow => {
      const dead = isDead(p);
      return {
        exportId,
        snapshotId,
        path: p.relativePath,
        sourcePath: p.sourcePath,
        landingPath: landingPath(exportId, snapshotId, p.relativePath),
        status: dead ? 'expired' : 'queued',
        attempts: 0,
        // A live SAS expiry on a queued row means "its message is on the queue": set once it is.
        sasExpiresOn: dead ? p.sasExpiresOn?.toISOString() : undefined,
        queuedAt: now.toISOString(),
        ...(dead ? { lastError: DEAD_ON_ARRIVAL_REASON } : {}),
      };
    });
  const needed = offered.filter((p) => {
    const row = existing.get(p.relativePath);
    return row === undefined || needsAnotherMessage(row, now, inputs.sasSafetyMarginInMs);
  });
  const resumed = needed.filter((p) => existing.has(p.relativePath));
  return {
    unchanged: false,
    supersede,
    createSnapshot: inputs.snapshot
      ? undefined
      : {
          exportId,
          generatedTime,
          snapshotId,
          status: 'requested',
          partCount: offered.length,
          partsLanded: 0,
          bytesLanded: 0,
          requestedAt: now.toISOString(),
          lastRequestedAt: now.toISOString(),
        },
    newParts,
    requeue: resumed.filter((p) => !isDead(p)).map((p) => p.relativePath),
    markExpired: resumed
      .filter(isDead)
      .map((p) => ({ path: p.relativePath, sasExpiresOn: p.sasExpiresOn?.toISOString() })),
    enqueue: needed.filter((p) => !isDead(p)),
    expired: needed.filter(isDead),
    offered,
    landed,
  };
}

/** A URL whose SAS is already dead, or dies within the safety margin, is not worth a message. */
export function isDeadOnArrival(part: SourcePart, now: Date, marginInMs: number): boolean {
  return part.sasExpiresOn !== undefined && part.sasExpiresOn.getTime() - marginInMs <= now.getTime();
}

/** A part needs a fresh message when its last one cannot succeed any more. */
export function needsAnotherMessage(row: PartRow, now: Date, marginInMs: number): boolean {
  switch (row.status) {
    case 'landed':
      return false;
    case 'expired':
    case 'failed':
      return true;
    case 'queued': {
      const expires = row.sasExpiresOn ? Date.parse(row.sasExpiresOn) : Number.NaN;
      // A queued part whose message still holds a valid SAS is in flight: do not copy it twice.
      return Number.isNaN(expires) || expires - marginInMs <= now.getTime();
    }
  }
}

/**
 * The snapshot's status after the tick: a new snapshot starts copying; a failed one, or a complete one whose file
 * list grew, copies again when the tick sends messages; otherwise complete and superseded stay as they are.
 */
export function statusAfterTick(current: SnapshotStatus, messagesSent: number): SnapshotStatus {
  if (current === 'requested') return 'copying';
  if ((current === 'failed' || current === 'complete') && messagesSent > 0) return 'copying';
  return current;
}

function distinctParts(parts: readonly OfferedPart[]): OfferedPart[] {
  const seen = new Map<string, OfferedPart>();
  for (const p of parts) if (!seen.has(p.relativePath)) seen.set(p.relativePath, p);
  return [...seen.values()];
}
