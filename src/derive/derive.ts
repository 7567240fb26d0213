import { isExportId } from '../core/catalog.js';
import { Semaphore } from '../core/concurrency.js';
import type { SnapshotManifest } from '../core/contracts.js';
import { classifyStorageError, MdvmError } from '../core/errors.js';
import { boundedDeadLetter, safeStringify } from '../core/messages.js';
import { redact } from '../core/redact.js';
import type { Runtime } from '../core/runtime.js';
import type { Telemetry } from '../core/telemetry.js';
import { buildChangeSet, nextCompleteSnapshot } from './changeSets.js';
import { completeCuratedIfReady, curatePart, readRawManifest } from './curate.js';
import { type DeriveMessage, encodeDeriveMessage, parseDeriveMessage } from './messages.js';

/**
 * The derive queue's two jobs, fanned out like the copy: one message per raw part to curate, one per snapshot for its
 * change set. Enqueued by the completion of a raw snapshot (or by `mdvm-ingest derive` for existing ones); each
 * handler re-reads the raw manifest, so a message can only name work on a complete snapshot's own parts.
 */
export function derivationsOf(runtime: Runtime, manifest: SnapshotManifest): DeriveMessage[] {
  const { curatedExports, changeSetExports } = runtime.config.derive;
  if (!isExportId(manifest.export)) return [];
  const base = { v: 1 as const, export: manifest.export, snapshot: manifest.snapshot };
  return [
    ...(curatedExports.includes(manifest.export)
      ? manifest.parts.map((p) => ({ ...base, kind: 'curate-part' as const, part: p.path }))
      : []),
    ...(changeSetExports.includes(manifest.export) ? [{ ...base, kind: 'change-set' as const }] : []),
  ];
}

/** Called by completion before the snapshot is marked complete: a crash in between enqueues again (duplicates are harmless). */
export async function enqueueDerivations(runtime: Runtime, manifest: SnapshotManifest): Promise<number> {
  const messages = derivationsOf(runtime, manifest);
  if (messages.some((m) => m.kind === 'change-set')) {
    // A later snapshot's change set compared against an older snapshot than this one: build it again.
    const next = await nextCompleteSnapshot(runtime, manifest);
    if (next) messages.push({ v: 1, kind: 'change-set', export: manifest.export, snapshot: next });
  }
  const queue = runtime.storage.deriveQueue;
  for (let i = 0; i < messages.length; i += 16) {
    await Promise.all(
      messages.slice(i, i + 16).map((m) => queue.sendMessage(encodeDeriveMessage(m), { messageTimeToLive: -1 })),
    );
  }
  return messages.length;
}

/**
 * A derive message that can never succeed, on the derive poison queue with why (derive messages carry no credential).
 * Bounded like the copy's dead letters: the message that came in fit the queue, but JSON escaping and base64 can
 * make the letter around it too big for one (413), which would leave it on the host's poison queue with no reason.
 */
export async function parkDeriveMessage(runtime: Runtime, input: unknown, reason: string): Promise<void> {
  const original =
    typeof input === 'string' ? input : Buffer.isBuffer(input) ? input.toString('utf8') : safeStringify(input);
  const letter = boundedDeadLetter(redact(reason), redact(original), runtime.now().toISOString());
  await runtime.storage.derivePoisonQueue
    .sendMessage(Buffer.from(JSON.stringify(letter)).toString('base64'))
    .catch((error: unknown) => {
      throw classifyStorageError(error, 'park the derive message');
    });
}

export interface DeriveOutcome {
  readonly kind: DeriveMessage['kind'];
  readonly outcome: 'landed' | 'duplicate' | 'superseded';
  readonly summary: string;
}

/**
 * The host hands a queue function up to batchSize + newBatchThreshold messages at once (12, ADR 0001), sized for
 * copies. A conversion holds one row group and a change set one entry per previous record, so this process runs at
 * most MDVM_DERIVE_CONCURRENCY of them; the other invocations wait here, their messages kept hidden by the host.
 */
const slots = new WeakMap<Runtime, Semaphore>();
export function deriveSlots(runtime: Runtime): Semaphore {
  let semaphore = slots.get(runtime);
  if (!semaphore) {
    semaphore = new Semaphore(runtime.config.derive.concurrency);
    slots.set(runtime, semaphore);
  }
  return semaphore;
}

export async function handleDeriveMessage(
  runtime: Runtime,
  telemetry: Telemetry,
  input: unknown,
  options: { abortSignal?: AbortSignal } = {},
): Promise<DeriveOutcome> {
  const message = parseDeriveMessage(input);
  return deriveSlots(runtime).run(() => derive(runtime, telemetry, message, options));
}

async function derive(
  runtime: Runtime,
  telemetry: Telemetry,
  message: DeriveMessage,
  options: { abortSignal?: AbortSignal },
): Promise<DeriveOutcome> {
  if (!isExportId(message.export)) throw new MdvmError('invalid-input', `unknown export type '${message.export}'`);
  const manifest = await readRawManifest(runtime, message.export, message.snapshot);
  if (message.kind === 'curate-part') {
    const result = await curatePart(runtime, telemetry, manifest, message.part, options);
    const curated = await completeCuratedIfReady(runtime, telemetry, manifest);
    return {
      kind: message.kind,
      outcome: result.outcome,
      summary: `${result.path}: ${result.rows} rows ${result.outcome}${curated ? '; curated snapshot complete' : ''}`,
    };
  }
  const changes = await buildChangeSet(runtime, telemetry, manifest, options);
  const t = changes.totals;
  return {
    kind: message.kind,
    outcome: changes.outcome,
    summary: `${changes.path}: ${t.added} added, ${t.removed} removed, ${t.changed} changed, ${t.expired} expired (${changes.outcome})`,
  };
}
