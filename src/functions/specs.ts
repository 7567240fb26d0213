import type { InvocationContext, Timer } from '@azure/functions';
import { DELTA_EXPORT, type LandedExportId } from '../core/catalog.js';
import type { AppConfig } from '../core/config.js';
import { errorMessage, MdvmError } from '../core/errors.js';
import { landPart } from '../core/landPart.js';
import { requestDelta, requestJsonSnapshot } from '../core/pagedRead.js';
import { requestSnapshot } from '../core/requestSnapshot.js';
import type { Runtime } from '../core/runtime.js';
import { redactingLogger, Telemetry, type TelemetryEvent } from '../core/telemetry.js';
import { handleDeriveMessage, parkDeriveMessage } from '../derive/derive.js';
import { deriveMessageLabels } from '../derive/messages.js';

/**
 * The app's functions as data: name, trigger and handler. The Functions host entry point (index.ts) registers
 * exactly this list with `app.timer` / `app.storageQueue`; the in-process host (src/host) behind
 * `mdvm-ingest run`, `npm start` and the tests drives the same list. Handlers are thin: they build telemetry
 * for the invocation and call core code.
 */
export interface TimerFunctionSpec {
  readonly kind: 'timer';
  readonly name: string;
  readonly exportId: LandedExportId;
  readonly trigger: { readonly schedule: string; readonly runOnStartup: boolean; readonly useMonitor: boolean };
  readonly handler: (timer: Timer, context: InvocationContext) => Promise<void>;
}

export interface QueueFunctionSpec {
  readonly kind: 'storageQueue';
  readonly name: string;
  readonly trigger: { readonly queueName: string; readonly connection: string };
  /**
   * `abortSignal`: the in-process host aborts a delivery still running past `run --timeout-s` (and its grace); the
   * Functions host passes none, its functionTimeout ends the worker instead.
   */
  readonly handler: (message: unknown, context: InvocationContext, abortSignal?: AbortSignal) => Promise<void>;
}

export type FunctionSpec = TimerFunctionSpec | QueueFunctionSpec;

/** The queue trigger's connection: the runtime storage account the host itself uses. */
export const QUEUE_CONNECTION = 'AzureWebJobsStorage';
export const COPY_FUNCTION_NAME = 'copy-part';
export const DERIVE_FUNCTION_NAME = 'derive';
const PARK_AT_ONCE: ReadonlySet<string> = new Set(['invalid-input', 'not-found', 'fatal']);
export const timerFunctionName = (exportId: LandedExportId): string => `export-${exportId}`;

export interface FunctionSpecOptions {
  /** Extra sink for telemetry events (tests and the CLI's progress display). */
  onTelemetry?: (event: TelemetryEvent) => void;
  /** Stops the timers' ticks (the in-process host: Ctrl-C or `run --timeout-s`); copies have their own signal. */
  tickAbortSignal?: AbortSignal;
}

export function functionSpecs(config: AppConfig, runtime: Runtime, options: FunctionSpecOptions = {}): FunctionSpec[] {
  const tickOptions = options.tickAbortSignal ? { abortSignal: options.tickAbortSignal } : {};
  const timer = (
    exportId: LandedExportId,
    schedule: string,
    tick: (telemetry: Telemetry) => Promise<string>,
  ): TimerFunctionSpec => ({
    kind: 'timer',
    name: timerFunctionName(exportId),
    exportId,
    trigger: { schedule, runOnStartup: false, useMonitor: true },
    handler: async (_timer, context) => {
      const telemetry = telemetryFor(context, options);
      try {
        context.log(await tick(telemetry));
      } catch (error) {
        if (error instanceof MdvmError && error.kind === 'rate-limited') {
          // Expected under the documented call budgets: the next tick tries again.
          context.warn(`${exportId}: rate limited, next tick retries: ${error.message}`);
          telemetry.track('request', { export: exportId, outcome: 'rate-limited', reason: error.message });
          return;
        }
        telemetry.track('request', { export: exportId, outcome: 'error', reason: errorMessage(error) });
        throw redacted(error);
      }
    },
  });
  const timers = config.exports.map((exportId) =>
    config.jsonExports.includes(exportId)
      ? timer(exportId, config.schedule, async (telemetry) => {
          const result = await requestJsonSnapshot(runtime, telemetry, exportId, tickOptions);
          return `${exportId}: JSON snapshot ${result.snapshotId} ${result.outcome}; ${result.pagesLanded} pages, ${result.recordsLanded} records`;
        })
      : timer(exportId, config.schedule, async (telemetry) => {
          const result = await requestSnapshot(runtime, telemetry, exportId, tickOptions);
          return `${exportId}: snapshot ${result.snapshotId} ${result.outcome}; ${result.partsEnqueued}/${result.partCount} parts enqueued`;
        }),
  );
  if (config.delta) {
    timers.push(
      timer(DELTA_EXPORT.id, config.delta.schedule, async (telemetry) => {
        const result = await requestDelta(runtime, telemetry, tickOptions);
        return `${DELTA_EXPORT.id}: window ${result.snapshotId || '-'} ${result.outcome}; ${result.pagesLanded} pages, ${result.recordsLanded} records${result.reason ? `; ${result.reason}` : ''}`;
      }),
    );
  }
  const copy: QueueFunctionSpec = {
    kind: 'storageQueue',
    name: COPY_FUNCTION_NAME,
    trigger: { queueName: config.queueName, connection: QUEUE_CONNECTION },
    handler: async (message, context, abortSignal) => {
      const telemetry = telemetryFor(context, options);
      try {
        await landPart(runtime, telemetry, message, {
          dequeueCount: dequeueCountOf(context),
          ...(abortSignal ? { abortSignal } : {}),
        });
      } catch (error) {
        throw redacted(error);
      }
    },
  };
  const derive: QueueFunctionSpec = {
    kind: 'storageQueue',
    name: DERIVE_FUNCTION_NAME,
    trigger: { queueName: config.derive.queueName, connection: QUEUE_CONNECTION },
    handler: async (message, context, abortSignal) => {
      const telemetry = telemetryFor(context, options);
      try {
        context.log(
          (await handleDeriveMessage(runtime, telemetry, message, abortSignal ? { abortSignal } : {})).summary,
        );
      } catch (error) {
        // Stopped by the host, not failed: the message reappears after its lease.
        if (abortSignal?.aborted) throw redacted(error);
        if (error instanceof MdvmError && PARK_AT_ONCE.has(error.kind)) {
          // A message naming no complete snapshot's part, or a raw part that no longer matches its manifest: retrying
          // cannot help. Parked at once with the reason; `mdvm-ingest derive` builds it once the cause is fixed.
          await parkDeriveMessage(runtime, message, error.message);
          telemetry.track('derived', {
            ...deriveMessageLabels(message),
            outcome: 'dead-lettered',
            reason: error.message,
          });
          context.warn(`derive: message parked on ${config.derive.poisonQueueName}: ${error.message}`);
          return;
        }
        telemetry.track('derived', { ...deriveMessageLabels(message), outcome: 'failed', reason: errorMessage(error) });
        throw redacted(error);
      }
    },
  };
  return [...timers, copy, derive];
}

function telemetryFor(context: InvocationContext, options: FunctionSpecOptions): Telemetry {
  const logger = redactingLogger((level, line) => {
    if (level === 'error') context.error(line);
    else if (level === 'warn') context.warn(line);
    else context.log(line);
  });
  return new Telemetry(logger, options.onTelemetry);
}

function dequeueCountOf(context: InvocationContext): number {
  const raw = context.triggerMetadata?.dequeueCount as unknown;
  // Worker 3.16.0 delivered 64-bit values as {low, high}.
  if (raw && typeof raw === 'object' && 'low' in raw) return Number((raw as { low: number }).low);
  const n = Number(raw ?? 1);
  return Number.isFinite(n) && n > 0 ? n : 1;
}

/** What the host logs of a thrown error must carry no credential: only redacted MdvmErrors leave. */
function redacted(error: unknown): MdvmError {
  return error instanceof MdvmError ? error : new MdvmError('transient', errorMessage(error));
}
