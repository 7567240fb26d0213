import { setTimeout as sleep } from 'node:timers/promises';
import type { QueueClient } from '@azure/storage-queue';
import type { ExportId } from '../core/catalog.js';
import { MAX_DEQUEUE_COUNT } from '../core/landPart.js';
import type { Runtime } from '../core/runtime.js';
import type { TelemetryEvent } from '../core/telemetry.js';
import { COPY_FUNCTION_NAME, registerFunctions, timerFunctionName } from '../functions/register.js';
import {
  installFunctionsHostCapture,
  invoke,
  type RegisteredFunction,
  registeredFunctions,
  resetRegistrations,
} from './functionsHost.js';

export interface LocalRunnerOptions {
  /** Concurrent queue workers (the host's batchSize + newBatchThreshold plays this role in Azure). */
  workers?: number;
  /** Seconds a received message stays invisible while a worker handles it. */
  visibilityTimeoutInSeconds?: number;
  /** Seconds before a failed message is retried (host.json visibilityTimeout; shorter locally). */
  retryDelayInSeconds?: number;
  /** Every log line the handlers write, already redacted. */
  onLog?: (level: string, line: string) => void;
  onTelemetry?: (event: TelemetryEvent) => void;
}

export interface DrainOptions {
  timeoutInMs?: number;
  abortSignal?: AbortSignal;
}

export interface TickReport {
  readonly exportId: ExportId;
  readonly error?: string;
}

/**
 * Drives the registered handlers the way the Functions host would: timer ticks on request, and a
 * queue listener with N workers, at-least-once delivery, retry after a visibility delay and the
 * poison queue after MAX_DEQUEUE_COUNT attempts.
 */
export class LocalRunner {
  private readonly workers: number;
  private readonly options: LocalRunnerOptions;
  private timers = new Map<ExportId, RegisteredFunction>();
  private copy: RegisteredFunction | undefined;

  constructor(
    private readonly runtime: Runtime,
    options: LocalRunnerOptions = {},
  ) {
    this.options = options;
    this.workers = options.workers ?? 8;
  }

  /** Register the app's functions exactly as the host entry point does, and keep the handlers. */
  register(): ReadonlyMap<string, RegisteredFunction> {
    installFunctionsHostCapture();
    resetRegistrations();
    registerFunctions(this.runtime.config, this.runtime, {
      ...(this.options.onTelemetry ? { onTelemetry: this.options.onTelemetry } : {}),
    });
    const registered = registeredFunctions();
    this.timers = new Map();
    for (const id of this.runtime.config.exports) {
      const fn = registered.get(timerFunctionName(id));
      if (fn) this.timers.set(id, fn);
    }
    this.copy = registered.get(COPY_FUNCTION_NAME);
    return new Map(registered);
  }

  /** One tick of each timer (all enabled exports by default), in parallel like the host would. */
  async tick(exportIds: readonly ExportId[] = this.runtime.config.exports): Promise<TickReport[]> {
    if (this.timers.size === 0) this.register();
    const timerInput = { isPastDue: false, schedule: { adjustForDST: true }, scheduleStatus: {} };
    return Promise.all(
      exportIds.map(async (exportId) => {
        const fn = this.timers.get(exportId);
        if (!fn) return { exportId, error: `no timer registered for ${exportId} (is it in MDVM_EXPORTS?)` };
        try {
          await invoke(fn, timerInput, { log: (level, line) => this.options.onLog?.(level, line) });
          return { exportId };
        } catch (error) {
          return { exportId, error: (error as Error).message };
        }
      }),
    );
  }

  /** Handle queue messages until the queue is empty and nothing is in flight (or the timeout). */
  async drain(options: DrainOptions = {}): Promise<void> {
    if (!this.copy) this.register();
    const copy = this.copy;
    if (!copy) throw new Error(`no ${COPY_FUNCTION_NAME} function registered`);
    const queue = this.runtime.queue;
    const deadline = Date.now() + (options.timeoutInMs ?? 10 * 60_000);
    let inFlight = 0;
    let done = false;

    const worker = async (): Promise<void> => {
      while (!done && !options.abortSignal?.aborted && Date.now() < deadline) {
        const received = await queue.receiveMessages({
          numberOfMessages: 1,
          visibilityTimeout: this.options.visibilityTimeoutInSeconds ?? 120,
        });
        const message = received.receivedMessageItems[0];
        if (!message) {
          if (inFlight === 0 && (await queue.getProperties()).approximateMessagesCount === 0) {
            done = true;
            return;
          }
          await sleep(100);
          continue;
        }
        inFlight++;
        try {
          await this.deliver(copy, queue, message);
        } finally {
          inFlight--;
        }
      }
    };
    await Promise.all(Array.from({ length: this.workers }, worker));
  }

  private async deliver(
    copy: RegisteredFunction,
    queue: QueueClient,
    message: Awaited<ReturnType<QueueClient['receiveMessages']>>['receivedMessageItems'][number],
  ): Promise<void> {
    const text = message.messageText;
    // The host decodes base64; a message that is not base64 goes straight to the poison queue.
    if (!/^[A-Za-z0-9+/]*={0,2}$/.test(text) || text.length % 4 !== 0) {
      await this.runtime.poisonQueue.sendMessage(text);
      await queue.deleteMessage(message.messageId, message.popReceipt);
      return;
    }
    const decoded = Buffer.from(text, 'base64').toString('utf8');
    let input: unknown = decoded;
    try {
      input = JSON.parse(decoded);
    } catch {
      // The host passes non-JSON text through as a string.
    }
    // Like the host, keep the message hidden while the copy runs, however long it takes.
    const visibility = this.options.visibilityTimeoutInSeconds ?? 120;
    let popReceipt = message.popReceipt;
    const renew = setInterval(
      () => {
        queue
          .updateMessage(message.messageId, popReceipt, text, visibility)
          .then((r) => {
            if (r.popReceipt) popReceipt = r.popReceipt;
          })
          .catch(() => {
            // Lost the message (expired or taken over): the delete below will say so harmlessly.
          });
      },
      (visibility * 1000) / 2,
    );
    let failure: unknown;
    try {
      await invoke(copy, input, {
        triggerMetadata: {
          dequeueCount: message.dequeueCount,
          id: message.messageId,
          popReceipt: message.popReceipt,
          insertionTime: message.insertedOn,
          expirationTime: message.expiresOn,
        },
        log: (level, line) => this.options.onLog?.(level, line),
      });
    } catch (error) {
      failure = error;
    } finally {
      clearInterval(renew);
    }
    if (failure === undefined) return settle(queue.deleteMessage(message.messageId, popReceipt));
    // The host logs the failed invocation's exception; so do we.
    this.options.onLog?.(
      'error',
      `${COPY_FUNCTION_NAME} failed (delivery ${message.dequeueCount}): ${(failure as Error).message}`,
    );
    if (message.dequeueCount >= MAX_DEQUEUE_COUNT) {
      await this.runtime.poisonQueue.sendMessage(text);
      await settle(queue.deleteMessage(message.messageId, popReceipt));
    } else {
      // Visible again after the retry delay, text unchanged (Azurite rejects an update without text).
      await settle(queue.updateMessage(message.messageId, popReceipt, text, this.options.retryDelayInSeconds ?? 1));
    }
  }
}

/** A delete or update of a message someone else now holds (404, stale pop receipt) is not our failure. */
async function settle(operation: Promise<unknown>): Promise<void> {
  try {
    await operation;
  } catch (error) {
    const status = (error as { statusCode?: number }).statusCode;
    if (status !== 404 && status !== 400) throw error;
  }
}
