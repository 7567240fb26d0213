import { z } from 'zod';
import { MdvmError } from '../core/errors.js';

// core/contracts.ts publishes this schema, so nothing here may import it back (a cycle would leave it undefined).

/**
 * The derive-queue message: one curated part, or one snapshot's change set. It names only landing-container paths the
 * handler re-derives and checks against the raw manifest; it carries no credential.
 */
export const DERIVE_KINDS = ['curate-part', 'change-set'] as const;

export const deriveMessageSchema = z.discriminatedUnion('kind', [
  z.object({
    v: z.literal(1),
    kind: z.literal('curate-part'),
    export: z.string().min(1).max(64),
    snapshot: z.string().regex(/^\d{4}-\d{2}-\d{2}T\d{4}(\d{2}(\.\d{3})?)?Z$/),
    /** The raw part's landing path, as the raw manifest lists it. */
    part: z.string().min(1).max(1024),
  }),
  z.object({
    v: z.literal(1),
    kind: z.literal('change-set'),
    export: z.string().min(1).max(64),
    snapshot: z.string().regex(/^\d{4}-\d{2}-\d{2}T\d{4}(\d{2}(\.\d{3})?)?Z$/),
  }),
]);

export type DeriveMessage = z.output<typeof deriveMessageSchema>;

export function encodeDeriveMessage(message: DeriveMessage): string {
  return Buffer.from(JSON.stringify(deriveMessageSchema.parse(message)), 'utf8').toString('base64');
}

export function parseDeriveMessage(input: unknown): DeriveMessage {
  let value = Buffer.isBuffer(input) ? input.toString('utf8') : input;
  if (typeof value === 'string') {
    try {
      value = JSON.parse(value);
    } catch {
      throw new MdvmError('invalid-input', 'derive message is not JSON');
    }
  }
  const parsed = deriveMessageSchema.safeParse(value);
  if (!parsed.success) {
    throw new MdvmError(
      'invalid-input',
      `message does not match the v1 derive schema: ${parsed.error.issues.map((i) => `${i.path.join('.') || '(root)'}: ${i.message}`).join('; ')}`,
    );
  }
  return parsed.data;
}

/** The export, snapshot and kind (as `method`) a derive message names, when it parses: telemetry about one that failed. */
export function deriveMessageLabels(input: unknown): { export?: string; snapshot?: string; method?: string } {
  try {
    const m = parseDeriveMessage(input);
    // The same method names the `derived` events of built outputs carry, so a failure groups with its kind.
    return { export: m.export, snapshot: m.snapshot, method: m.kind === 'curate-part' ? 'curated' : 'changes' };
  } catch {
    return {};
  }
}
