import { createHash, randomBytes } from 'node:crypto';
import type { TableClient } from '@azure/data-tables';
import { CallBudget, pagedCallBudget } from '../../src/core/callBudget.js';
import type { ExportId } from '../../src/core/catalog.js';
import { loadConfig } from '../../src/core/config.js';
import { manifestSchema, type SnapshotManifest } from '../../src/core/contracts.js';
import type { PartCopier } from '../../src/core/copier.js';
import { createRuntime, type Runtime } from '../../src/core/runtime.js';
import { ensureStorage } from '../../src/core/storage.js';
import type { TelemetryEvent } from '../../src/core/telemetry.js';
import {
  changeSetManifestSchema,
  changesManifestPath,
  curatedManifestPath,
  curatedManifestSchema,
} from '../../src/derive/contracts.js';
import { InProcessHost } from '../../src/host/inProcessHost.js';
import { type LocalAzurite, startAzurite } from '../../src/local/azurite.js';
import { DefenderSimulator, type PublishOptions } from '../../src/simulator/simulator.js';

/** One Azurite + one simulator per test file; each test gets its own queue, tables and container. */
export interface Stack {
  readonly azurite: LocalAzurite;
  readonly simulator: DefenderSimulator;
  stop(): Promise<void>;
}

export async function startStack(): Promise<Stack> {
  const azurite = await startAzurite();
  const simulator = await DefenderSimulator.start({ source: azurite.source });
  // What the Functions platform sets for a managed identity; the app's DefaultAzureCredential reads it.
  Object.assign(process.env, simulator.identityEnvironment);
  return {
    azurite,
    simulator,
    stop: async () => {
      await simulator.stop();
      await azurite.stop();
    },
  };
}

export interface TestApp {
  readonly runtime: Runtime;
  readonly runner: InProcessHost;
  /** Every line the handlers logged (level + text). */
  readonly logs: { level: string; line: string }[];
  readonly events: TelemetryEvent[];
  /** Unique per test, so tests in one file never see each other's data. */
  readonly suffix: string;
  /** The app settings this app was built from (what a child process needs to act on the same data). */
  readonly env: Record<string, string>;
}

/** The settings of an app on this stack, with its own queue, tables and landing container (named by `suffix`). */
export function appSettings(stack: Stack, suffix: string): Record<string, string> {
  return {
    AzureWebJobsStorage: stack.azurite.customer.connectionString,
    MDVM_LANDING_CONNECTION_STRING: stack.azurite.customer.connectionString,
    MDVM_DEFENDER_API_BASE_URL: stack.simulator.baseUrl,
    MDVM_ALLOW_LOOPBACK: 'true',
    MDVM_PARTS_QUEUE: `parts-${suffix}`,
    MDVM_DERIVE_QUEUE: `derive-${suffix}`,
    MDVM_SNAPSHOTS_TABLE: `snapshots${suffix}`,
    MDVM_PARTS_TABLE: `parts${suffix}`,
    MDVM_LANDING_CONTAINER: `landing-${suffix}`,
  };
}

export async function createApp(
  stack: Stack,
  settings: Record<string, string> = {},
  options: {
    workers?: number;
    /** Wrap the real copier, e.g. to crash part-way through a copy. */
    wrapCopier?: (real: PartCopier) => Pick<PartCopier, 'copy'>;
    /** Replace collaborators of the runtime, e.g. to crash between two table writes. */
    wrapRuntime?: (real: Runtime) => Runtime;
  } = {},
): Promise<TestApp> {
  const suffix = randomBytes(4).toString('hex');
  const env = { ...appSettings(stack, suffix), ...settings };
  const config = loadConfig(env);
  const real = createRuntime(config, {
    // Fresh budget per app (each test is its own "process"), fast backoff for 5xx retries.
    defenderClientOptions: { retryBaseDelayInMs: 20, callBudget: new CallBudget(), pagedCallBudget: pagedCallBudget() },
  });
  const withCopier: Runtime = options.wrapCopier
    ? { ...real, copier: options.wrapCopier(real.copier) as PartCopier }
    : real;
  const runtime = options.wrapRuntime ? options.wrapRuntime(withCopier) : withCopier;
  await ensureStorage(runtime.storage);
  const logs: { level: string; line: string }[] = [];
  const events: TelemetryEvent[] = [];
  const runner = new InProcessHost(runtime, {
    workers: options.workers ?? 4,
    retryDelayInSeconds: 1,
    onLog: (level, line) => logs.push({ level, line }),
    onTelemetry: (event) => events.push(event),
  });
  return { runtime, runner, logs, events, suffix, env: { ...env, ...stack.simulator.identityEnvironment } };
}

/**
 * For createApp's `wrapRuntime`: the runtime with some methods of one collaborator replaced (to fail, crash, count or
 * stall at a chosen moment). `methods` gets the real collaborator to delegate to; every other method is the real one.
 */
export function replacing<K extends 'store' | 'queue' | 'defender'>(
  key: K,
  methods: (real: Runtime[K]) => Partial<Runtime[K]>,
): (runtime: Runtime) => Runtime {
  return (runtime) => {
    const real = runtime[key];
    return { ...runtime, [key]: Object.assign(Object.create(real) as Runtime[K], methods(real)) };
  };
}

/**
 * For createApp's `wrapRuntime`: a tick watched (and held) at its part-row transactions and its sends.
 * `beforeRowWrite(n)` runs before the n-th transaction of new part rows (from 1) and may hold it; `beforeSend(n)` before
 * the n-th message goes to the queue; `afterSend(n)` once n messages are there.
 */
export function watchingTick(hooks: {
  beforeRowWrite?: (n: number) => Promise<unknown> | undefined;
  beforeSend?: (n: number) => void;
  afterSend?: (n: number) => void;
}): (runtime: Runtime) => Runtime {
  let transactions = 0;
  let sends = 0;
  let sent = 0;
  return (runtime) =>
    replacing('store', (real) => ({
      insertParts: async (rows) => {
        await hooks.beforeRowWrite?.(++transactions);
        return real.insertParts(rows);
      },
    }))(
      replacing('queue', (real) => ({
        sendMessage: async (...args) => {
          hooks.beforeSend?.(++sends);
          const response = await real.sendMessage(...args);
          hooks.afterSend?.(++sent);
          return response;
        },
      }))(runtime),
    );
}

export function md5(buffer: Buffer): string {
  return createHash('md5').update(buffer).digest('base64');
}

export async function tableRows(table: TableClient): Promise<Record<string, unknown>[]> {
  const rows: Record<string, unknown>[] = [];
  for await (const e of table.listEntities()) rows.push(e as Record<string, unknown>);
  return rows;
}

export async function listBlobNames(app: TestApp, prefix?: string): Promise<string[]> {
  const names: string[] = [];
  for await (const b of app.runtime.landing.listBlobsFlat(prefix ? { prefix } : {})) names.push(b.name);
  return names.sort();
}

/** Take every message off the parts queue and put each back `times` times (at-least-once delivery). */
export async function duplicateQueuedMessages(app: TestApp, times: number): Promise<number> {
  const queue = app.runtime.queue;
  const texts: string[] = [];
  for (;;) {
    const batch = await queue.receiveMessages({ numberOfMessages: 32, visibilityTimeout: 300 });
    if (batch.receivedMessageItems.length === 0) break;
    for (const m of batch.receivedMessageItems) {
      texts.push(m.messageText);
      await queue.deleteMessage(m.messageId, m.popReceipt);
    }
  }
  for (const text of texts) for (let i = 0; i < times; i++) await queue.sendMessage(text);
  return texts.length;
}

export async function queueTexts(app: TestApp, which: 'parts' | 'poison'): Promise<string[]> {
  const queue = which === 'parts' ? app.runtime.queue : app.runtime.poisonQueue;
  const peeked = await queue.peekMessages({ numberOfMessages: 32 });
  return peeked.peekedMessageItems.map((m) => m.messageText);
}

/** A JSON blob of the landing container, parsed. */
export async function readLandedJson(app: TestApp, path: string): Promise<unknown> {
  return JSON.parse((await app.runtime.landing.getBlobClient(path).downloadToBuffer()).toString('utf8'));
}

/** A snapshot's curated `_manifest.json`, checked against its contract. */
export async function landedCuratedManifest(app: TestApp, exportId: string, snapshotId: string) {
  return curatedManifestSchema.parse(await readLandedJson(app, curatedManifestPath(exportId, snapshotId)));
}

/** A snapshot's change-set `_manifest.json`, checked against its contract. */
export async function landedChangeSetManifest(app: TestApp, exportId: string, snapshotId: string) {
  return changeSetManifestSchema.parse(await readLandedJson(app, changesManifestPath(exportId, snapshotId)));
}

/** The raw manifest `_latest.json` names for an export, checked against its contract. */
export async function latestRawManifest(app: TestApp, exportId: string): Promise<SnapshotManifest> {
  const latest = (await readLandedJson(app, `${exportId}/_latest.json`)) as { manifest: string };
  return manifestSchema.parse(await readLandedJson(app, latest.manifest));
}

/** Publish one snapshot of an export, run a tick and drain both queues: the raw manifest it completed as. */
export async function publishAndLand(
  stack: Stack,
  app: TestApp,
  exportId: ExportId,
  options: PublishOptions,
): Promise<SnapshotManifest> {
  await stack.simulator.publish(exportId, options);
  stack.simulator.resetRateLimits();
  await app.runner.tick();
  await app.runner.drain();
  return latestRawManifest(app, exportId);
}
