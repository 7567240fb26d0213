import { createHash } from 'node:crypto';
import { z } from 'zod';
import { manifestPath, snapshotFolder } from '../core/parts.js';

/**
 * Where derived data lives and what its manifests promise. Curated Parquet mirrors the raw snapshot folders under
 * `curated/`, change sets sit under `changes/`; each has its own `_manifest.json`, written last and create-only, so
 * the same rule holds as for raw data: a folder without a manifest is not complete.
 */
export const CURATED_PREFIX = 'curated';
export const CHANGES_PREFIX = 'changes';

export function curatedFolder(exportId: string, snapshotId: string): string {
  return `${CURATED_PREFIX}/${snapshotFolder(exportId, snapshotId)}`;
}

/** `<export>/snapshot=<id>/<part>.json.gz` → `curated/<export>/snapshot=<id>/<part>.parquet`. */
export function curatedPartPath(rawLandingPath: string): string {
  return `${CURATED_PREFIX}/${rawLandingPath.replace(/\.json\.gz$/i, '')}.parquet`;
}

export function curatedManifestPath(exportId: string, snapshotId: string): string {
  return `${CURATED_PREFIX}/${manifestPath(exportId, snapshotId)}`;
}

export function changesFolder(exportId: string, snapshotId: string): string {
  return `${CHANGES_PREFIX}/${snapshotFolder(exportId, snapshotId)}`;
}

/** One data file per set of inputs (`identity`), so a build from other inputs never overwrites the one a manifest names. */
export function changesDataPath(exportId: string, snapshotId: string, identity: string): string {
  const id = createHash('sha256').update(identity).digest('hex').slice(0, 16);
  return `${changesFolder(exportId, snapshotId)}/changes-${id}.json.gz`;
}

export function changesManifestPath(exportId: string, snapshotId: string): string {
  return `${CHANGES_PREFIX}/${manifestPath(exportId, snapshotId)}`;
}

/**
 * What a derived dataset was made from: the raw manifest's parts, by path and MD5 (or length). If Defender later lists
 * more files for the same snapshot, the raw manifest is replaced and this digest changes, so derived manifests made
 * from the old list are rebuilt instead of standing as complete.
 */
export function sourceDigest(parts: readonly { path: string; md5: string | null; bytes: number }[]): string {
  const hash = createHash('sha256');
  for (const p of parts) hash.update(`${p.path}\t${p.md5 ?? `bytes:${p.bytes}`}\n`);
  return hash.digest('base64');
}

const isoTime = z.iso.datetime({ offset: true });
const count = z.number().int().nonnegative();

/** What every derived manifest says about the raw snapshot it was made from. */
const derivedFrom = {
  v: z.literal(1),
  export: z.string().min(1),
  snapshot: z.string().min(1),
  generatedTime: isoTime,
  completedAt: isoTime,
  /** The raw snapshot's `_manifest.json` this was made from. */
  source: z.string().min(1),
  /** Digest of the raw manifest's part list: a raw manifest replaced with more parts makes this one stale. */
  sourceDigest: z.string().min(1),
};

export const curatedManifestSchema = z
  .object({
    ...derivedFrom,
    kind: z.literal('curated'),
    format: z.literal('parquet'),
    columns: z.array(z.object({ name: z.string().min(1), type: z.string().min(1) })),
    totals: z.object({ parts: count, rows: count, bytes: count }),
    parts: z.array(
      z.object({
        path: z.string().min(1),
        /** The raw part (landing path) it was converted from. */
        source: z.string().min(1),
        rows: count,
        bytes: count,
        md5: z.string().min(1),
      }),
    ),
  })
  .describe(
    'curated/<export>/snapshot=<id>/_manifest.json: the Parquet copy of a complete snapshot, one file per raw part.',
  )
  .superRefine((m, ctx) => {
    if (m.totals.parts !== m.parts.length)
      ctx.addIssue({ code: 'custom', path: ['totals', 'parts'], message: 'does not match the parts listed' });
    if (m.totals.rows !== m.parts.reduce((s, p) => s + p.rows, 0))
      ctx.addIssue({ code: 'custom', path: ['totals', 'rows'], message: 'is not the sum of the parts' });
    if (m.totals.bytes !== m.parts.reduce((s, p) => s + p.bytes, 0))
      ctx.addIssue({ code: 'custom', path: ['totals', 'bytes'], message: 'is not the sum of the parts' });
  });

export const CHANGE_KINDS = ['added', 'removed', 'changed', 'expired'] as const;

export const changeSetManifestSchema = z
  .object({
    ...derivedFrom,
    kind: z.literal('changes'),
    /** The complete snapshot compared against; null for the first snapshot of an export (nothing to compare). */
    previous: z
      .object({
        snapshot: z.string().min(1),
        generatedTime: isoTime,
        manifest: z.string().min(1),
        /** Digest of the previous raw manifest's part list. */
        sourceDigest: z.string().min(1),
      })
      .nullable(),
    keyColumns: z.array(z.string().min(1)),
    trackedColumns: z.array(z.string().min(1)),
    totals: z.object({
      added: count,
      removed: count,
      changed: count,
      expired: count,
      rows: count,
      devices: count,
      /** Records whose key repeated within one snapshot (kept once; see the README's keys table). */
      duplicateKeys: count,
    }),
    path: z.string().min(1),
    bytes: count,
    md5: z.string().min(1),
  })
  .describe(
    'changes/<export>/snapshot=<id>/_manifest.json: what appeared, disappeared or changed per device since the previous complete snapshot.',
  )
  .superRefine((m, ctx) => {
    const { added, removed, changed, expired, rows } = m.totals;
    if (rows !== added + removed + changed + expired)
      ctx.addIssue({ code: 'custom', path: ['totals', 'rows'], message: 'is not the sum of the kinds' });
  });

export type CuratedManifest = z.output<typeof curatedManifestSchema>;
export type ChangeSetManifest = z.output<typeof changeSetManifestSchema>;
export type ChangeKind = (typeof CHANGE_KINDS)[number];
