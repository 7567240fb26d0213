import type { InvocationContext, Timer } from '@azure/functions';
import type { ExportId } from '../core/catalog.js';
import type { AppConfig } from '../core/config.js';
import { errorMessage, MdvmError } from '../core/errors.js';
import { landPart } from '../core/landPart.js';
import { requestSnapshot } from '../core/requestSnapshot.js';
import type { Runtime } from '../core/runtime.js';
import { redactingLogger, Telemetry, type TelemetryEvent } from '../core/telemetry.js';
import { app } from './azureFunctions.js';

/** The queue trigger's connection: the runtime storage account the host itself uses. */
export const QUEUE_CONNECTION = 'AzureWebJobsStorage';
export const COPY_FUNCTION_NAME = 'copy-part';
export const timerFunctionName = (exportId: ExportId): string => `export-${exportId}`;

export interface RegisterOptions {
  /** Extra sink for telemetry events (tests and the local runner's progress display). */
  onTelemetry?: (event: TelemetryEvent) => void;
}

function telemetryFor(context: InvocationContext, options: RegisterOptions): Telemetry {
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

/** Thin triggers: each one declares itself and hands over to core code. */
export function registerFunctions(config: AppConfig, runtime: Runtime, options: RegisterOptions = {}): void {
  for (const exportId of config.exports) {
    app.timer(timerFunctionName(exportId), {
      schedule: config.schedule,
      runOnStartup: false,
      useMonitor: true,
      handler: async (_timer: Timer, context: InvocationContext) => {
        const telemetry = telemetryFor(context, options);
        try {
          const result = await requestSnapshot(runtime, telemetry, exportId);
          context.log(
            `${exportId}: snapshot ${result.snapshotId} ${result.outcome}; ${result.partsEnqueued}/${result.partCount} parts enqueued`,
          );
        } catch (error) {
          if (error instanceof MdvmError && error.kind === 'rate-limited') {
            // Expected under the 20 calls/hour budget: the next tick tries again.
            context.warn(`${exportId}: rate limited, next tick retries: ${error.message}`);
            telemetry.track('request', { export: exportId, outcome: 'rate-limited', reason: error.message });
            return;
          }
          telemetry.track('request', { export: exportId, outcome: 'error', reason: errorMessage(error) });
          throw redacted(error);
        }
      },
    });
  }

  app.storageQueue(COPY_FUNCTION_NAME, {
    queueName: config.queueName,
    connection: QUEUE_CONNECTION,
    handler: async (message: unknown, context: InvocationContext) => {
      const telemetry = telemetryFor(context, options);
      try {
        await landPart(runtime, telemetry, message, { dequeueCount: dequeueCountOf(context) });
      } catch (error) {
        throw redacted(error);
      }
    },
  });
}
