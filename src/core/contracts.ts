import { z } from 'zod';
import { changeSetManifestSchema, curatedManifestSchema } from '../derive/contracts.js';
import { deriveMessageSchema } from '../derive/messages.js';

/**
 * The pipeline's last edge, as schemas: the rows of the `snapshots` and `parts` tables, `_manifest.json` and
 * `_latest.json` (the queue message's schema is in messages.ts). Every row and blob is parsed with these when it
 * is written and when it is read, so a corrupted row stops the pipeline with its name instead of turning into a
 * wrong manifest. docs/contracts/*.schema.json are generated from them for downstream readers
 * (test/unit/contracts.test.ts keeps them in step); docs/contracts.md describes them.
 */
const isoTime = z.iso.datetime({ offset: true });
const count = z.number().int().nonnegative();
/** Merges cannot delete a property, so "no error" is written as '' (the store reads it back as absent). */
const clearableText = z.string().optional();
/** A time that can be cleared the same way: '' is "none" (read back as absent). */
const clearableTime = isoTime.or(z.literal('')).optional();

export const SNAPSHOT_STATUSES = ['requested', 'copying', 'complete', 'superseded', 'failed'] as const;
export const PART_STATUSES = ['queued', 'landed', 'expired', 'failed'] as const;
export const VERIFICATIONS = ['md5', 'length'] as const;
/**
 * How a snapshot was read from Defender: `files` (via files, copied part by part), `json` (the paged `…ByMachine`
 * endpoint, one landed part per page) or `delta` (the software-vulnerability changes of a window).
 */
export const READ_MODES = ['files', 'json', 'delta'] as const;

/** `snapshots` table: PartitionKey = export id, RowKey = generatedTime (canonical ISO, sortable). */
export const snapshotRowSchema = z
  .object({
    exportId: z.string().min(1),
    generatedTime: isoTime,
    snapshotId: z.string().min(1),
    status: z.enum(SNAPSHOT_STATUSES),
    partCount: count,
    partsLanded: count,
    /** Files Defender listed that the tick refused (wrong export, names too long): the snapshot cannot complete. */
    partsRefused: count.optional(),
    bytesLanded: count,
    recordsLanded: count.optional(),
    requestedAt: isoTime,
    lastRequestedAt: isoTime,
    completedAt: isoTime.optional(),
    manifestPath: z.string().min(1).optional(),
    supersededBy: isoTime.optional(),
    lastError: clearableText,
    /** Absent: files. */
    mode: z.enum(READ_MODES).optional(),
    /** Paged reads: the URL of the next page to land ('' once the last page is in). */
    cursor: clearableText,
    /** Delta: the window's start (the `sinceTime` asked for); the window ends at generatedTime. */
    since: isoTime.optional(),
    /** Delta: where the next window starts once this one is complete (the watermark). */
    nextSince: isoTime.optional(),
  })
  .describe('A row of the snapshots table: PartitionKey = exportId, RowKey = generatedTime.');

/** `parts` table: PartitionKey = `{export}_{snapshot}`, RowKey = encoded part path. */
export const partRowSchema = z
  .object({
    exportId: z.string().min(1),
    snapshotId: z.string().min(1),
    path: z.string().min(1),
    sourcePath: z.string().min(1),
    landingPath: z.string().min(1),
    status: z.enum(PART_STATUSES),
    attempts: count,
    bytes: count.optional(),
    md5: z.string().min(1).optional(),
    records: count.optional(),
    durationMs: z.number().nonnegative().optional(),
    copyMethod: z.string().min(1).optional(),
    verification: z.enum(VERIFICATIONS).optional(),
    lastError: clearableText,
    sasExpiresOn: clearableTime,
    queuedAt: isoTime.optional(),
    landedAt: isoTime.optional(),
  })
  .describe('A row of the parts table. A landed part also has bytes, landedAt and verification.')
  .superRefine((row, ctx) => {
    // A landed part is listed in the manifest by these: without them the manifest would be a guess.
    if (row.status !== 'landed') return;
    for (const key of ['bytes', 'landedAt', 'verification'] as const) {
      if (row[key] === undefined) {
        ctx.addIssue({ code: 'custom', path: [key], message: 'required when the part is landed' });
      }
    }
  });

export const manifestPartSchema = z.object({
  /** Landing blob name. */
  path: z.string().min(1),
  /** Part identity: OrgId=…/_RbacGroupId=…/part-….json.gz (the parts table's `path`). */
  part: z.string().min(1),
  bytes: count,
  md5: z.string().min(1).nullable(),
  records: count.nullable(),
  verification: z.enum(VERIFICATIONS).nullable(),
});

/** `<export>/snapshot=<id>/_manifest.json`: written once, last, create-only. */
export const manifestSchema = z
  .object({
    v: z.literal(1),
    export: z.string().min(1),
    exportTitle: z.string().min(1),
    snapshot: z.string().min(1),
    generatedTime: isoTime,
    completedAt: isoTime,
    /** How the data was read from Defender (absent in manifests written before JSON mode: files). */
    mode: z.enum(READ_MODES).optional(),
    /** Delta windows: the changes from `since` (Defender's sinceTime) up to `until` (when the read began). */
    window: z.object({ since: isoTime, until: isoTime }).optional(),
    totals: z.object({ parts: count, bytes: count, records: count.nullable() }),
    parts: z.array(manifestPartSchema),
  })
  .describe('_manifest.json of a complete snapshot. totals.parts is the number of parts, totals.bytes their sum.')
  .superRefine((m, ctx) => {
    if (m.totals.parts !== m.parts.length) {
      ctx.addIssue({ code: 'custom', path: ['totals', 'parts'], message: 'does not match the parts listed' });
    }
    if (m.totals.bytes !== m.parts.reduce((sum, p) => sum + p.bytes, 0)) {
      ctx.addIssue({ code: 'custom', path: ['totals', 'bytes'], message: 'is not the sum of the parts' });
    }
  });

/** `<export>/_latest.json`: the newest complete snapshot; only ever moves forward. */
export const latestSchema = z
  .object({
    v: z.literal(1),
    export: z.string().min(1),
    snapshot: z.string().min(1),
    generatedTime: isoTime,
    manifest: z.string().min(1),
    updatedAt: isoTime,
  })
  .describe('<export>/_latest.json: the newest complete snapshot of the export; it only moves forward.');

export type SnapshotStatus = (typeof SNAPSHOT_STATUSES)[number];
export type PartStatus = (typeof PART_STATUSES)[number];
export type SnapshotRow = z.output<typeof snapshotRowSchema>;
export type PartRow = z.output<typeof partRowSchema>;
export type SnapshotManifest = z.output<typeof manifestSchema>;
export type LatestPointer = z.output<typeof latestSchema>;

/** The contracts published for downstream readers, by file name under docs/contracts/. */
export const PUBLISHED_CONTRACTS = {
  'manifest.schema.json': manifestSchema,
  'latest.schema.json': latestSchema,
  'snapshot-row.schema.json': snapshotRowSchema,
  'part-row.schema.json': partRowSchema,
  'curated-manifest.schema.json': curatedManifestSchema,
  'change-set-manifest.schema.json': changeSetManifestSchema,
  'derive-message.schema.json': deriveMessageSchema,
} as const;

/** Why a value does not match its contract, in one line: `field: problem; field: problem`. */
export function contractProblems(error: z.ZodError): string {
  return error.issues.map((i) => `${i.path.join('.') || '(root)'}: ${i.message}`).join('; ');
}

/** JSON text to a value for a contract to judge; text that is not JSON is undefined (which no contract accepts). */
export function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}
