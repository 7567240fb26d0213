import { setTimeout as sleep } from 'node:timers/promises';
import type { LandedExportId } from '../core/catalog.js';
import type { Runtime } from '../core/runtime.js';
import type { TelemetryEvent } from '../core/telemetry.js';
import { InProcessHost } from '../host/inProcessHost.js';
import { type ExportSummary, summarize } from './summary.js';

export interface RunOptions {
  readonly exports: readonly LandedExportId[];
  /** In-process queue workers. */
  readonly workers: number;
  readonly timeoutInMs: number;
  /** Ctrl-C: stop taking messages; copies in flight finish (within the timeout's grace), nothing is half-written. */
  readonly abortSignal?: AbortSignal;
  /** Pause between queue checks while other consumers (a deployed app) still hold messages. */
  readonly pollIntervalInMs?: number;
  readonly onEvent?: (event: TelemetryEvent) => void;
  readonly onLog?: (level: string, line: string) => void;
}

export interface RunRow extends ExportSummary {
  /** What the timer logic said: enqueued, resumed, unchanged, completed, rate-limited, or error. */
  readonly tick: string;
  /** Why the row looks the way it does, in words. */
  readonly note: string;
  readonly ok: boolean;
}

export interface RunReport {
  readonly rows: readonly RunRow[];
  readonly ok: boolean;
  readonly partsCopied: number;
  readonly bytesCopied: number;
  readonly seconds: number;
  readonly interrupted: boolean;
  readonly timedOut: boolean;
  /** Copies still running at the timeout (and its grace), stopped unfinished: the next run copies their parts. */
  readonly unfinished: number;
  /** MiB/s per export for the snapshots completed in this run. */
  readonly throughput: ReadonlyMap<string, number>;
}

/**
 * One-shot ingestion through the same handlers the Functions host runs: one timer tick per export type,
 * then N in-process workers drain the parts queue until every snapshot this run started is complete,
 * or can't go further (expired, failed), or the timeout passes. Other consumers may take messages at the
 * same time; completion stays exact because it lives in the tables, not in this process.
 */
export async function runIngestion(runtime: Runtime, options: RunOptions): Promise<RunReport> {
  const started = Date.now();
  const deadline = started + options.timeoutInMs;
  let partsCopied = 0;
  let bytesCopied = 0;
  const tickOutcome = new Map<string, string>();
  const tickReason = new Map<string, string>();
  // The snapshot each tick asked for: the report is about it, not about whichever row is newest.
  const tickSnapshot = new Map<string, string>();
  const throughput = new Map<string, number>();
  // The ticks stop at Ctrl-C and at the deadline too: a stalled Defender call or a long list cannot hold the run.
  const tickAbortSignal = AbortSignal.any([
    AbortSignal.timeout(Math.max(1, options.timeoutInMs)),
    ...(options.abortSignal ? [options.abortSignal] : []),
  ]);
  const runner = new InProcessHost(runtime, {
    workers: options.workers,
    tickAbortSignal,
    ...(options.onLog ? { onLog: options.onLog } : {}),
    onTelemetry: (event) => {
      if (event.event === 'part' && event.outcome === 'landed') {
        partsCopied++;
        bytesCopied += event.bytes ?? 0;
      }
      if (event.event === 'request' && event.export && event.outcome !== 'superseded') {
        tickOutcome.set(event.export, event.outcome);
        if (event.snapshot) tickSnapshot.set(event.export, event.snapshot);
        if (event.reason) tickReason.set(event.export, event.reason);
      }
      if (event.event === 'snapshot' && event.outcome === 'completed' && event.export && event.durationMs) {
        throughput.set(event.export, (event.bytes ?? 0) / 1024 / 1024 / Math.max(event.durationMs / 1000, 0.001));
      }
      options.onEvent?.(event);
    },
  });

  // Copies start while the ticks still enqueue: the first drain listens until every tick has returned.
  const ticking = runner.tick(options.exports);
  const overlapping = runner.drain({
    timeoutInMs: Math.max(0, deadline - Date.now()),
    ...(options.abortSignal ? { abortSignal: options.abortSignal } : {}),
    keepListeningUntil: ticking,
  });
  // Awaited together: a drain that fails while the ticks still run must reject here, never unobserved.
  const [ticks, first] = await Promise.all([ticking, overlapping]);
  let unfinished = first.unfinished;
  const tickErrors = new Map(ticks.filter((t) => t.error).map((t) => [t.exportId, t.error ?? '']));
  const watched = options.exports.filter((id) => !tickErrors.has(id));

  let timedOut = false;
  while (!options.abortSignal?.aborted) {
    const remaining = deadline - Date.now();
    if (remaining <= 0) {
      timedOut = true;
      break;
    }
    const drained = await runner.drain({
      timeoutInMs: remaining,
      ...(options.abortSignal ? { abortSignal: options.abortSignal } : {}),
    });
    unfinished += drained.unfinished;
    const summaries = await summarize(runtime, watched, tickSnapshot);
    if (!summaries.some((s) => s.status !== 'complete' && s.queued > 0)) break;
    // Parts are still queued but our queue view is empty: another consumer holds them.
    await sleep(options.pollIntervalInMs ?? 2_000, undefined, { signal: options.abortSignal }).catch(() => {});
  }

  const summaries = await summarize(runtime, options.exports, tickSnapshot);
  const rows = summaries.map((s): RunRow => {
    const tick = tickErrors.has(s.exportId) ? 'error' : (tickOutcome.get(s.exportId) ?? 'none');
    const ok = s.status === 'complete' && !tickErrors.has(s.exportId);
    return { ...s, tick, ok, note: noteFor(s, tick, tickErrors.get(s.exportId), tickReason.get(s.exportId)) };
  });
  return {
    rows,
    ok: unfinished === 0 && rows.every((r) => r.ok),
    partsCopied,
    bytesCopied,
    seconds: (Date.now() - started) / 1000,
    interrupted: options.abortSignal?.aborted ?? false,
    timedOut,
    unfinished,
    throughput,
  };
}

function noteFor(s: ExportSummary, tick: string, error: string | undefined, reason: string | undefined): string {
  if (error) return firstLine(error);
  // A paged read that refused or failed says why (the delta without a full snapshot to start from).
  if ((tick === 'refused' || tick === 'failed') && reason) return firstLine(reason);
  if (tick === 'unchanged') return 'unchanged — nothing copied';
  if (tick === 'empty') return 'Defender listed no files — nothing recorded, the next run asks again';
  if (tick === 'rate-limited') return `rate limited — ${firstLine(reason ?? 'next run retries')}`;
  if (s.status === 'complete') return tick === 'resumed' ? 'resumed and completed' : 'complete';
  const parts = [`${s.partsLanded}/${s.partCount} parts`];
  if (s.expired) parts.push(`${s.expired} expired`);
  if (s.failed) parts.push(`${s.failed} failed`);
  if (s.queued) parts.push(`${s.queued} still queued`);
  const next = s.expired || s.failed || s.queued ? ' — next run resumes' : '';
  // The reason matters for failed parts (source gone, corrupt); expired parts just need fresh URLs.
  return `${parts.join(', ')}${next}${s.lastError && s.failed ? ` (${firstLine(s.lastError)})` : ''}`;
}

function firstLine(text: string): string {
  const line = text.split('\n')[0] ?? '';
  return line.length > 160 ? `${line.slice(0, 157)}…` : line;
}
