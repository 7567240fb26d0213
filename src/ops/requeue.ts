import { MdvmError } from '../core/errors.js';
import { bindingProblem, parseCheckedPartMessage } from '../core/landPart.js';
import { messageTimeToLiveInSeconds, type PartMessage, parsePartMessage } from '../core/messages.js';
import { redact } from '../core/redact.js';
import type { Runtime } from '../core/runtime.js';

export interface RequeueEntry {
  export: string | null;
  part: string | null;
  action: 'moved' | 'would-move' | 'refused' | 'skipped';
  reason: string;
}

/** `requeue --json` shape (v1, documented in README). */
export interface RequeueReport {
  v: 1;
  dryRun: boolean;
  moved: number;
  refused: number;
  entries: RequeueEntry[];
}

export interface RequeueOptions {
  readonly exportId?: string;
  readonly dryRun?: boolean;
}

/**
 * Moves part messages from the poison queue back onto the parts queue after a fix, each one validated
 * again exactly as the copier would: schema, source URL policy, a matching part row not yet landed, and a
 * SAS that is still valid. Refused messages stay on the poison queue with the reason reported.
 */
export async function requeuePoisoned(runtime: Runtime, options: RequeueOptions = {}): Promise<RequeueReport> {
  const entries: RequeueEntry[] = [];
  // Judged messages stay hidden until the pass ends, so every receive brings new ones and the loop ends
  // when the poison queue has nothing left to show; then the ones we keep are made visible again.
  const kept: { messageId: string; popReceipt: string; text: string }[] = [];
  try {
    for (;;) {
      const batch = await runtime.poisonQueue.receiveMessages({ numberOfMessages: 32, visibilityTimeout: 300 });
      if (batch.receivedMessageItems.length === 0) break;
      for (const item of batch.receivedMessageItems) {
        const { entry, message } = await judge(runtime, item.messageText, options);
        entries.push(entry);
        if (entry.action === 'moved' && message) {
          await runtime.queue.sendMessage(item.messageText, {
            messageTimeToLive: messageTimeToLiveInSeconds(
              message,
              runtime.config.defender.sasValidHours,
              runtime.now(),
            ),
          });
          await runtime.poisonQueue.deleteMessage(item.messageId, item.popReceipt);
        } else {
          kept.push({ messageId: item.messageId, popReceipt: item.popReceipt, text: item.messageText });
        }
      }
    }
  } finally {
    for (const k of kept) {
      // The text goes back unchanged (Azurite rejects an update without one).
      await runtime.poisonQueue.updateMessage(k.messageId, k.popReceipt, k.text, 0).catch(() => {});
    }
  }
  return {
    v: 1,
    dryRun: options.dryRun ?? false,
    moved: entries.filter((e) => e.action === 'moved' || e.action === 'would-move').length,
    refused: entries.filter((e) => e.action === 'refused').length,
    entries,
  };
}

/** The verdict, plus the message itself when it moves (never part of the printed entry: it holds the SAS). */
async function judge(
  runtime: Runtime,
  text: string,
  options: RequeueOptions,
): Promise<{ entry: RequeueEntry; message?: PartMessage }> {
  const entry = await verdict(runtime, text, options);
  if (entry.action !== 'moved') return { entry };
  return { entry, message: parsePartMessage(Buffer.from(text, 'base64').toString('utf8')) };
}

async function verdict(runtime: Runtime, text: string, options: RequeueOptions): Promise<RequeueEntry> {
  const decoded = Buffer.from(text, 'base64').toString('utf8');
  let json: unknown;
  try {
    json = JSON.parse(decoded);
  } catch {
    return { export: null, part: null, action: 'refused', reason: 'not a base64 JSON message' };
  }
  if (json === null || typeof json !== 'object' || Array.isArray(json)) {
    return { export: null, part: null, action: 'refused', reason: 'not a JSON object' };
  }
  const letter = json as { reason?: unknown; original?: unknown };
  if (typeof letter.reason === 'string' && typeof letter.original === 'string') {
    return {
      export: null,
      part: null,
      action: 'refused',
      reason: `dead-lettered by the app (${redact(letter.reason)}); it never carried a usable SAS — the next timer tick re-enqueues missing parts`,
    };
  }
  try {
    const { message, sourcePath } = parseCheckedPartMessage(json, runtime.config);
    if (options.exportId && message.export !== options.exportId) {
      return {
        export: message.export,
        part: message.part,
        action: 'skipped',
        reason: `not --export ${options.exportId}`,
      };
    }
    const row = await runtime.store.getPart(message.export, message.snapshot, message.part);
    if (!row) throw new MdvmError('invalid-input', 'no part row for it in the manifest tables');
    const unbound = bindingProblem(sourcePath, row.value);
    if (unbound) throw new MdvmError('invalid-input', unbound);
    if (row.value.status === 'landed') {
      return { export: message.export, part: message.part, action: 'refused', reason: 'already landed' };
    }
    const expires = message.sasExpiresOn ? Date.parse(message.sasExpiresOn) : Number.NaN;
    const rowExpires = row.value.sasExpiresOn ? Date.parse(row.value.sasExpiresOn) : Number.NaN;
    if (row.value.status === 'queued' && !Number.isNaN(rowExpires) && (Number.isNaN(expires) || rowExpires > expires)) {
      return {
        export: message.export,
        part: message.part,
        action: 'refused',
        reason: 'a newer message for this part is already queued (a timer resumed it)',
      };
    }
    if (!Number.isNaN(expires) && expires - runtime.config.sasSafetyMarginInMs <= runtime.now().getTime()) {
      return {
        export: message.export,
        part: message.part,
        action: 'refused',
        reason: 'its SAS has expired; `mdvm-ingest run` asks Defender for fresh URLs and resumes the snapshot',
      };
    }
    if (!options.dryRun && row.value.status !== 'queued') {
      await runtime.store.mutatePart(message.export, message.snapshot, message.part, (r) =>
        r.status === 'landed' ? undefined : { status: 'queued' },
      );
    }
    return {
      export: message.export,
      part: message.part,
      action: options.dryRun ? 'would-move' : 'moved',
      reason: 'valid part message',
    };
  } catch (error) {
    return { export: null, part: null, action: 'refused', reason: redact((error as Error).message) };
  }
}
