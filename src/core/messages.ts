import { z } from 'zod';
import { EXPORT_IDS, type ExportId, getExportType } from './catalog.js';
import { MdvmError } from './errors.js';

/** The longest SAS URL a part message carries (the tick refuses a longer one rather than fail to send it). */
export const MAX_SOURCE_URL_LENGTH = 8192;

/**
 * The parts-queue message (contract: docs/contracts.md, "Queue messages"): JSON, versioned, one part per message,
 * base64 on the wire (the Functions queue trigger's default encoding).
 */
export const partMessageSchema = z.object({
  v: z.literal(1),
  export: z.enum(EXPORT_IDS as [ExportId, ...ExportId[]]),
  snapshot: z.string().regex(/^\d{4}-\d{2}-\d{2}T\d{4}(\d{2}(\.\d{3})?)?Z$/),
  generatedTime: z.iso.datetime(),
  part: z.string().min(1).max(1024),
  sourceUrl: z.string().min(1).max(MAX_SOURCE_URL_LENGTH),
  sasExpiresOn: z.iso.datetime().nullable(),
  enqueuedAt: z.iso.datetime(),
  /** W3C trace context of the tick that enqueued it (optional: messages without it still parse). */
  traceparent: z
    .string()
    .regex(/^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$/)
    .optional(),
});

export type PartMessage = z.output<typeof partMessageSchema>;

/** What a dead-lettered message looks like on the poison queue (our own dead letters). */
export interface DeadLetter {
  v: 1;
  reason: string;
  deadLetteredAt: string;
  /** The original message with every SAS query removed: the credential is never parked. */
  original: string;
}

/** A message lives no longer than its SAS (docs/contracts.md, "Queue messages"): until `sasExpiresOn`, or the export's capped lifetime. */
export function messageTimeToLiveInSeconds(message: PartMessage, sasValidHours: number, now: Date): number {
  if (message.sasExpiresOn) return Math.max(1, Math.floor((Date.parse(message.sasExpiresOn) - now.getTime()) / 1000));
  return Math.min(sasValidHours, getExportType(message.export).sasMaxHours) * 3600;
}

/** Validated on the way out as on the way in: the timer never enqueues what the copier would refuse. */
export function encodeMessage(message: PartMessage): string {
  const parsed = partMessageSchema.safeParse(message);
  if (!parsed.success) {
    throw new MdvmError('invalid-input', `part ${message.part}: ${schemaProblems(parsed.error)}`);
  }
  return Buffer.from(JSON.stringify(parsed.data), 'utf8').toString('base64');
}

function schemaProblems(error: z.ZodError): string {
  const reasons = error.issues
    .slice(0, 5)
    .map((i) => `${i.path.join('.') || '(root)'}: ${i.message}`)
    .join('; ');
  return `message does not match the v1 part schema: ${reasons}`;
}

/**
 * The Functions host hands the handler either the parsed JSON object or a string.
 * Anything that is not a valid v1 part message is `invalid-input` with a reason.
 */
export function parsePartMessage(input: unknown): PartMessage {
  let value = input;
  if (typeof input === 'string') {
    try {
      value = JSON.parse(input);
    } catch {
      throw new MdvmError('invalid-input', 'message is not JSON');
    }
  }
  if (Buffer.isBuffer(value)) {
    return parsePartMessage(value.toString('utf8'));
  }
  const parsed = partMessageSchema.safeParse(value);
  if (!parsed.success) throw new MdvmError('invalid-input', schemaProblems(parsed.error));
  return parsed.data;
}

/** A queue message is at most 64 KiB; the dead letter's base64 stays well under it. */
const MAX_DEAD_LETTER_BASE64 = 48 * 1024;

export function encodeDeadLetter(letter: DeadLetter): string {
  return Buffer.from(JSON.stringify(letter)).toString('base64');
}

/**
 * The dead letter with as much of the (already redacted) original as fits: JSON escaping can grow a character
 * six-fold (control characters) and base64 by a third, so the size is checked after encoding, not guessed before.
 */
export function boundedDeadLetter(reason: string, original: string, deadLetteredAt: string): DeadLetter {
  for (let keep = Math.min(original.length, 32_000); ; keep = Math.floor(keep / 2)) {
    const cut = keep < original.length;
    const letter: DeadLetter = {
      v: 1,
      reason: cut ? `${reason} (original cut to ${keep} of ${original.length} characters)` : reason,
      deadLetteredAt,
      original: original.slice(0, keep),
    };
    if (encodeDeadLetter(letter).length <= MAX_DEAD_LETTER_BASE64 || keep === 0) return letter;
  }
}

/** JSON of a value that came off a queue, or its String() when it cannot be JSON (a cycle, a BigInt). */
export function safeStringify(value: unknown): string {
  try {
    return JSON.stringify(value) ?? String(value);
  } catch {
    return String(value);
  }
}
