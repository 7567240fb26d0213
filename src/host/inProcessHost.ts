import { setTimeout as sleep } from 'node:timers/promises';
import type { InvocationContext as HostInvocationContext } from '@azure/functions';
import type { QueueClient } from '@azure/storage-queue';
import { type LandedExportId, landedExports } from '../core/catalog.js';
import { classifyStorageError, errorMessage, isStorageCondition, MdvmError } from '../core/errors.js';
import { MAX_DEQUEUE_COUNT } from '../core/landPart.js';
import type { Runtime } from '../core/runtime.js';
import type { TelemetryEvent } from '../core/telemetry.js';
import { InvocationContext } from '../functions/azureFunctions.js';
import {
  type FunctionSpec,
  functionSpecs,
  type QueueFunctionSpec,
  type TimerFunctionSpec,
} from '../functions/specs.js';

/** Azure Queue Storage hands out at most 32 messages per receive. */
const MAX_RECEIVE_BATCH = 32;
const MIN_IDLE_IN_MS = 50;
const DEFAULT_LEASE_IN_SECONDS = 30;
const MAX_IDLE_IN_MS = 1_000;
/**
 * Queue reads (each already retried by the storage SDK) that fail in a row before the drain gives up, waiting
 * 1, 2, 4 and 8 s between them: the Azure listener backs off and keeps polling, but a run must end some time.
 */
const QUEUE_READ_ATTEMPTS = 5;
const QUEUE_READ_BACKOFF_IN_MS = 1_000;
const DEFAULT_STOP_GRACE_IN_MS = 10_000;
/** How long deliveries get to end once aborted; one that ignores its signal is then left behind. */
const ABORTED_SETTLE_IN_MS = 5_000;

export interface InProcessHostOptions {
  /** Concurrent queue workers (the host's batchSize + newBatchThreshold plays this role in Azure). */
  workers?: number;
  /**
   * Seconds a received message stays invisible while a worker handles it (default 30), renewed every third of it
   * while the copy runs: short, so a run that is killed leaves its messages hidden for at most this long.
   */
  visibilityTimeoutInSeconds?: number;
  /** Seconds before a failed message is retried (host.json visibilityTimeout; shorter locally). */
  retryDelayInSeconds?: number;
  /** Every log line the handlers write, already redacted. */
  onLog?: (level: string, line: string) => void;
  onTelemetry?: (event: TelemetryEvent) => void;
  /** Stops ticks part-way (Ctrl-C, a deadline): what was enqueued stays, the next tick resumes the rest. */
  tickAbortSignal?: AbortSignal;
}

export interface DrainOptions {
  /** When to stop taking messages (default 10 min); deliveries in flight then get `stopGraceInMs` more to finish. */
  timeoutInMs?: number;
  /**
   * How long past the deadline deliveries in flight may run (default 10 s) before they are aborted: an aborted
   * delivery is neither deleted nor failed, its message reappears after its lease.
   */
  stopGraceInMs?: number;
  abortSignal?: AbortSignal;
  /** Keep listening, even on an empty queue, until this settles (ticks still enqueueing while copies run). */
  keepListeningUntil?: Promise<unknown>;
  /** Drain only this queue (tests that need derive messages to pile up before they run). Default: both. */
  only?: 'parts' | 'derive';
}

export interface DrainReport {
  /** Deliveries stopped at the deadline, unfinished: their messages reappear after their lease. */
  readonly unfinished: number;
}

export interface TickReport {
  readonly exportId: LandedExportId;
  readonly error?: string;
}

/**
 * The Functions host's part, played in this process for the operator CLI (`mdvm-ingest run`, and `npm start`
 * through it) and the tests: it drives the same function specs the host entry point registers
 * (functions/specs.ts), through a real `InvocationContext`: timer ticks on request, and a queue listener with N
 * workers, at-least-once delivery, retry after a visibility delay and the poison queue after
 * MAX_DEQUEUE_COUNT attempts.
 */
export class InProcessHost {
  /** Every function, as the Functions host would register it. */
  readonly functions: readonly FunctionSpec[];
  private readonly workers: number;
  private readonly options: InProcessHostOptions;
  private readonly timers: ReadonlyMap<LandedExportId, TimerFunctionSpec>;
  private readonly copy: QueueFunctionSpec;
  private readonly derive: QueueFunctionSpec | undefined;

  constructor(
    private readonly runtime: Runtime,
    options: InProcessHostOptions = {},
  ) {
    this.options = options;
    this.workers = options.workers ?? 8;
    this.functions = functionSpecs(runtime.config, runtime, {
      ...(options.onTelemetry ? { onTelemetry: options.onTelemetry } : {}),
      ...(options.tickAbortSignal ? { tickAbortSignal: options.tickAbortSignal } : {}),
    });
    this.timers = new Map(
      this.functions.filter((f): f is TimerFunctionSpec => f.kind === 'timer').map((f) => [f.exportId, f]),
    );
    const queues = this.functions.filter((f): f is QueueFunctionSpec => f.kind === 'storageQueue');
    const copy = queues.find((f) => f.trigger.queueName === runtime.config.queueName);
    if (!copy) throw new Error('the app declares no queue function for the parts queue');
    this.copy = copy;
    this.derive = queues.find((f) => f.trigger.queueName === runtime.config.derive.queueName);
  }

  /** One tick of each timer (all enabled exports by default), in parallel like the host would. */
  async tick(exportIds: readonly LandedExportId[] = landedExports(this.runtime.config)): Promise<TickReport[]> {
    const timerInput = { isPastDue: false, schedule: { adjustForDST: true }, scheduleStatus: {} };
    return Promise.all(
      exportIds.map(async (exportId) => {
        const fn = this.timers.get(exportId);
        if (!fn) return { exportId, error: `no timer registered for ${exportId} (is it in MDVM_EXPORTS?)` };
        try {
          await invoke(fn, timerInput, { log: (level, line) => this.options.onLog?.(level, line) });
          return { exportId };
        } catch (error) {
          return { exportId, error: errorMessage(error) };
        }
      }),
    );
  }

  /**
   * Handle queue messages until the queue is empty and nothing is in flight (or the timeout): the parts queue, then
   * the derive queue, which completions fill (curated parts and change sets, when configured).
   */
  async drain(options: DrainOptions = {}): Promise<DrainReport> {
    const deadline = Date.now() + (options.timeoutInMs ?? 10 * 60_000);
    let unfinished = 0;
    if (options.only !== 'derive') {
      unfinished += await this.drainQueue(this.copy, this.runtime.queue, this.runtime.poisonQueue, {
        ...options,
        deadline,
      });
    }
    if (this.derive && options.only !== 'parts' && !options.abortSignal?.aborted) {
      const { keepListeningUntil: _, ...rest } = options;
      unfinished += await this.drainQueue(
        this.derive,
        this.runtime.storage.deriveQueue,
        this.runtime.storage.derivePoisonQueue,
        { ...rest, deadline },
      );
    }
    return { unfinished };
  }

  private async drainQueue(
    copy: QueueFunctionSpec,
    queue: QueueClient,
    poisonQueue: QueueClient,
    options: DrainOptions & { deadline: number },
  ): Promise<number> {
    const deadline = options.deadline;
    const inFlight = new Set<Promise<void>>();
    // Aborts the deliveries still running when the grace past the deadline ends.
    const stop = new AbortController();
    let unfinished = 0;
    let failure: unknown;
    let idleInMs = MIN_IDLE_IN_MS;
    let producing = options.keepListeningUntil !== undefined;
    options.keepListeningUntil?.then(
      () => {
        producing = false;
      },
      () => {
        producing = false;
      },
    );

    // One receive keeps a batch (up to 32, the queue's limit per call, and at most one per worker) ready ahead of the
    // workers, the way the host's batchSize + newBatchThreshold do: a worker that frees up starts the next message at
    // once, and a receive costs a fraction of a request per part. A message is leased from the moment it is received:
    // its invisibility is renewed while it waits for a worker and while it runs, so a wait never lets it reappear and
    // never adds to its dequeue count (a message handed back and fetched again would reach the poison queue's limit
    // before its first real attempt). It backs off while the queue is empty but messages are still invisible elsewhere.
    const visibilityInSeconds = this.options.visibilityTimeoutInSeconds ?? DEFAULT_LEASE_IN_SECONDS;
    const ready: Lease[] = [];
    const start = (lease: Lease): void => {
      const delivery: Promise<void> = this.deliver(copy, queue, poisonQueue, lease, stop.signal)
        .then(
          (finished) => {
            if (!finished) unfinished++;
          },
          (error: unknown) => {
            failure ??= error;
          },
        )
        .finally(() => inFlight.delete(delivery));
      inFlight.add(delivery);
    };
    const release = async (lease: Lease): Promise<void> => {
      const popReceipt = await lease.end();
      await settle(queue.updateMessage(lease.message.messageId, popReceipt, lease.message.messageText, 0)).catch(() => {
        // Could not hand it back: it reappears when its visibility timeout ends; nothing is lost.
      });
    };
    const stopping = () => failure !== undefined || options.abortSignal?.aborted === true || Date.now() >= deadline;
    // A queue read that fails (a dropped connection, a 5xx the SDK's own retries did not outlast) is tried again with
    // backoff, as the Azure listener does. One that is not transient, or keeps failing, ends the drain once the
    // deliveries in flight have settled.
    let readFailures = 0;
    const read = async <T>(what: string, call: () => Promise<T>): Promise<T | undefined> => {
      try {
        const result = await call();
        readFailures = 0;
        return result;
      } catch (error) {
        readFailures++;
        if (!classifyStorageError(error, what).retryable) {
          failure ??= error;
          return undefined;
        }
        if (readFailures >= QUEUE_READ_ATTEMPTS) {
          failure ??= new MdvmError(
            'transient',
            `${what} on queue ${queue.name} failed ${readFailures} times in a row, giving up: ${errorMessage(error)}`,
            { cause: error },
          );
          return undefined;
        }
        const waitInMs = QUEUE_READ_BACKOFF_IN_MS * 2 ** (readFailures - 1);
        this.options.onLog?.(
          'warning',
          `${what} on queue ${queue.name} failed (${readFailures} of ${QUEUE_READ_ATTEMPTS}), trying again in ${waitInMs / 1000} s: ${errorMessage(error)}`,
        );
        await sleep(Math.max(0, Math.min(waitInMs, deadline - Date.now())), undefined, {
          signal: options.abortSignal,
        }).catch(() => {});
        return undefined;
      }
    };
    let deadlineTimer: NodeJS.Timeout | undefined;
    const deadlinePassed = new Promise<void>((resolve) => {
      deadlineTimer = setTimeout(resolve, Math.max(0, deadline - Date.now()));
    });
    while (!stopping()) {
      while (ready.length > 0 && inFlight.size < this.workers) {
        const next = ready.shift();
        if (next) start(next);
      }
      if (ready.length > 0) {
        await Promise.race([...inFlight, deadlinePassed]);
        continue;
      }
      // Within a lease of the deadline, only as many as free workers start at once: a message received ahead and
      // handed back at the stop would have spent a delivery. (A Ctrl-C cannot be foreseen: it costs the messages
      // waiting for a worker one delivery each, as a host shutting down does.)
      const wanted = deadline - Date.now() < visibilityInSeconds * 1000 ? this.workers - inFlight.size : this.workers;
      if (wanted <= 0) {
        await Promise.race([...inFlight, deadlinePassed]);
        continue;
      }
      const received = await read('receive', () =>
        queue.receiveMessages({
          numberOfMessages: Math.min(MAX_RECEIVE_BATCH, wanted),
          visibilityTimeout: visibilityInSeconds,
        }),
      );
      if (!received) continue;
      const messages = received.receivedMessageItems;
      if (messages.length === 0) {
        if (!producing && inFlight.size === 0) {
          const properties = await read('getProperties', () => queue.getProperties());
          if (!properties) continue;
          if (properties.approximateMessagesCount === 0) break;
        }
        await Promise.race([sleep(idleInMs), ...inFlight]);
        idleInMs = Math.min(idleInMs * 2, MAX_IDLE_IN_MS);
        continue;
      }
      idleInMs = MIN_IDLE_IN_MS;
      ready.push(...messages.map((message) => new Lease(queue, message, visibilityInSeconds)));
    }
    // Stopped (failure, abort, deadline): messages received but never started are made visible again at once, so the
    // next run (or another instance) does not wait out their visibility timeout.
    await Promise.all(ready.splice(0).map(release));
    clearTimeout(deadlineTimer);
    // Deliveries in flight finish (after Ctrl-C too), but none runs past the deadline by more than the grace: a copy
    // that never ends must not hold the run, nor keep its message hidden by renewing it.
    const settled = Promise.all(inFlight);
    const graceInMs = options.stopGraceInMs ?? DEFAULT_STOP_GRACE_IN_MS;
    if (!(await settlesWithin(settled, deadline + graceInMs - Date.now()))) {
      this.options.onLog?.(
        'warning',
        `${copy.name}: stopping ${inFlight.size} deliveries still running ${graceInMs / 1000} s past the deadline; their messages reappear after their lease`,
      );
      stop.abort();
      if (!(await settlesWithin(settled, ABORTED_SETTLE_IN_MS))) unfinished += inFlight.size;
    }
    if (failure !== undefined) throw failure;
    return unfinished;
  }

  private async deliver(
    copy: QueueFunctionSpec,
    queue: QueueClient,
    poisonQueue: QueueClient,
    lease: Lease,
    stopSignal: AbortSignal,
  ): Promise<boolean> {
    const message = lease.message;
    const text = message.messageText;
    // The host decodes base64; a message that is not base64 goes straight to the poison queue.
    if (!/^[A-Za-z0-9+/]*={0,2}$/.test(text) || text.length % 4 !== 0) {
      // Sent or not, the lease ends here: a failed send must not leave the message renewed for good (it reappears and
      // is tried again); only a message parked is deleted.
      await poisonQueue.sendMessage(text).finally(() => lease.stopRenewing());
      await settle(queue.deleteMessage(message.messageId, await lease.end()));
      return true;
    }
    const decoded = Buffer.from(text, 'base64').toString('utf8');
    let input: unknown = decoded;
    try {
      input = JSON.parse(decoded);
    } catch {
      // The host passes non-JSON text through as a string.
    }
    // A stopped delivery's message is no longer kept hidden, even if its handler ignores the signal.
    const stopRenewing = () => lease.stopRenewing();
    stopSignal.addEventListener('abort', stopRenewing, { once: true });
    // A rejection is a failure whatever it carries, `undefined` included.
    let failed = false;
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
        abortSignal: stopSignal,
      });
    } catch (error) {
      failed = true;
      failure = error;
    } finally {
      stopSignal.removeEventListener('abort', stopRenewing);
    }
    const popReceipt = await lease.end();
    if (failed && stopSignal.aborted) {
      // Stopped, not failed: like a crashed delivery it is neither retried nor poisoned here; its message reappears
      // after its lease, and that delivery's dequeue count counts this attempt.
      this.options.onLog?.(
        'warning',
        `${copy.name} stopped (delivery ${message.dequeueCount}): ${errorMessage(failure)}`,
      );
      return false;
    }
    if (!failed) {
      await settle(queue.deleteMessage(message.messageId, popReceipt));
      return true;
    }
    // The host logs the failed invocation's exception; so do we.
    this.options.onLog?.('error', `${copy.name} failed (delivery ${message.dequeueCount}): ${errorMessage(failure)}`);
    if (message.dequeueCount >= MAX_DEQUEUE_COUNT) {
      await poisonQueue.sendMessage(text);
      await settle(queue.deleteMessage(message.messageId, popReceipt));
    } else {
      // Visible again after the retry delay, text unchanged (Azurite rejects an update without text).
      await settle(queue.updateMessage(message.messageId, popReceipt, text, this.options.retryDelayInSeconds ?? 1));
    }
    return true;
  }
}

type ReceivedMessage = Awaited<ReturnType<QueueClient['receiveMessages']>>['receivedMessageItems'][number];

/**
 * A received message kept invisible, as the Functions host does, from its receipt until its delivery settles: renewed
 * every third of the visibility timeout, one renewal at a time. Every renewal replaces the pop receipt, so whoever
 * deletes or updates the message takes the receipt from `end()`, after any renewal still out.
 */
class Lease {
  private popReceipt: string;
  private renewing: Promise<void> | undefined;
  private readonly timer: NodeJS.Timeout;

  constructor(
    queue: QueueClient,
    readonly message: ReceivedMessage,
    visibilityInSeconds: number,
  ) {
    this.popReceipt = message.popReceipt;
    this.timer = setInterval(
      () => {
        this.renewing ??= queue
          .updateMessage(message.messageId, this.popReceipt, message.messageText, visibilityInSeconds)
          .then(
            (r) => {
              if (r.popReceipt) this.popReceipt = r.popReceipt;
            },
            () => {
              // Lost the message (expired or taken over): the delete or update that ends the lease says so harmlessly.
            },
          )
          .finally(() => {
            this.renewing = undefined;
          });
      },
      (visibilityInSeconds * 1000) / 3,
    );
  }

  /** No more renewals: the message reappears when its visibility timeout ends. */
  stopRenewing(): void {
    clearInterval(this.timer);
  }

  /** Stops renewing and gives the newest pop receipt, once any renewal still out has returned. */
  async end(): Promise<string> {
    clearInterval(this.timer);
    await this.renewing;
    return this.popReceipt;
  }
}

/** Whether `promise` settles within `ms` (never rejects). */
async function settlesWithin(promise: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<false>((resolve) => {
    timer = setTimeout(() => resolve(false), Math.max(0, ms));
  });
  try {
    return await Promise.race([promise.then(() => true), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** A delete or update of a message someone else now holds (404, stale pop receipt) is not our failure. */
async function settle(operation: Promise<unknown>): Promise<void> {
  try {
    await operation;
  } catch (error) {
    if (!isStorageCondition(error, 'not-found', 'bad-request')) throw error;
  }
}

interface InvokeOptions {
  triggerMetadata?: Record<string, unknown>;
  log?: (level: string, message: string) => void;
  abortSignal?: AbortSignal;
}

/** Call a function's handler through a real InvocationContext, as the host does. */
async function invoke(fn: FunctionSpec, input: unknown, options: InvokeOptions = {}): Promise<void> {
  const context = new InvocationContext({
    invocationId: crypto.randomUUID(),
    functionName: fn.name,
    ...(options.triggerMetadata ? { triggerMetadata: options.triggerMetadata } : {}),
    logHandler: (level, ...args) => options.log?.(level, args.map(String).join(' ')),
  });
  // The host hands a timer its schedule status and a queue trigger the decoded message; both handlers are ours.
  await (fn.handler as (input: unknown, context: HostInvocationContext, abortSignal?: AbortSignal) => Promise<void>)(
    input,
    context,
    options.abortSignal,
  );
}
