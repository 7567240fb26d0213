import { createHash } from 'node:crypto';
import { type ExportId, isExportId, type LandedExportId } from '../core/catalog.js';
import { latestPointerProblem } from '../core/completion.js';
import { contractProblems, latestSchema, manifestSchema, parseJson, type SnapshotManifest } from '../core/contracts.js';
import { isStorageCondition } from '../core/errors.js';
import { compareGeneratedTime, latestPath, manifestPath, snapshotFolder } from '../core/parts.js';
import type { Runtime } from '../core/runtime.js';
import {
  changeSetManifestSchema,
  changesManifestPath,
  curatedManifestPath,
  curatedManifestSchema,
  sourceDigest,
} from '../derive/contracts.js';

export type FindingKind =
  | 'missing'
  | 'extra'
  | 'size-mismatch'
  | 'md5-mismatch'
  | 'manifest-table-mismatch'
  | 'no-manifest'
  | 'unknown-snapshot'
  | 'latest-behind'
  | 'derived-missing'
  | 'derived-stale';

export interface Finding {
  export: string;
  snapshot: string;
  kind: FindingKind;
  path: string;
  detail: string;
}

/** `verify --json` shape (v1, documented in README). */
export interface VerifyReport {
  v: 1;
  ok: boolean;
  deep: boolean;
  checked: { snapshots: number; blobs: number; bytesHashed: number };
  findings: Finding[];
}

export interface VerifyOptions {
  readonly exports: readonly LandedExportId[];
  /** Only this snapshot id (e.g. 2026-11-22T1801Z); default: every complete snapshot. */
  readonly snapshot?: string;
  /** Download and hash every landed blob instead of trusting the stored Content-MD5. */
  readonly deep?: boolean;
}

/**
 * Compares the landing container with the tables and each `_manifest.json`: missing and extra blobs,
 * size and MD5 mismatches, and disagreements between the manifest and the parts table.
 */
export async function verifyLanding(runtime: Runtime, options: VerifyOptions): Promise<VerifyReport> {
  const findings: Finding[] = [];
  const checked = { snapshots: 0, blobs: 0, bytesHashed: 0 };
  let snapshotFound = false;
  for (const exportId of options.exports) {
    const all = (await runtime.store.listSnapshots(exportId)).map((r) => r.value);
    const newestComplete = all.filter((s) => s.status === 'complete').at(-1);
    if (newestComplete && !options.snapshot) {
      const problem = await latestProblem(runtime, exportId, newestComplete.generatedTime);
      if (problem) {
        findings.push({
          export: exportId,
          snapshot: newestComplete.snapshotId,
          kind: 'latest-behind',
          path: latestPath(exportId),
          detail: problem,
        });
      }
    }
    const snapshots = all.filter((s) =>
      options.snapshot ? s.snapshotId === options.snapshot : s.status === 'complete',
    );
    if (options.snapshot && snapshots.length > 0) snapshotFound = true;
    if (options.snapshot && snapshots.length === 0 && options.exports.length === 1) {
      findings.push({
        export: exportId,
        snapshot: options.snapshot,
        kind: 'unknown-snapshot',
        path: snapshotFolder(exportId, options.snapshot),
        detail: 'no such snapshot in the snapshots table',
      });
    }
    for (const snapshot of snapshots) {
      checked.snapshots++;
      const add = (kind: FindingKind, path: string, detail: string) =>
        findings.push({ export: exportId, snapshot: snapshot.snapshotId, kind, path, detail });
      const folder = `${snapshotFolder(exportId, snapshot.snapshotId)}/`;
      const mPath = manifestPath(exportId, snapshot.snapshotId);

      const blobs = new Map<string, { bytes: number; md5: string | undefined }>();
      for await (const blob of runtime.landing.listBlobsFlat({ prefix: folder, includeMetadata: true })) {
        // Hierarchical-namespace accounts list their directories as empty blobs.
        if (blob.metadata?.hdi_isfolder === 'true') continue;
        const md5 = blob.properties.contentMD5;
        blobs.set(blob.name, {
          bytes: blob.properties.contentLength ?? 0,
          md5: md5 && md5.length > 0 ? Buffer.from(md5).toString('base64') : undefined,
        });
      }
      let manifest: SnapshotManifest | undefined;
      let text: string | undefined;
      try {
        text = (await runtime.landing.getBlockBlobClient(mPath).downloadToBuffer()).toString('utf8');
      } catch {
        if (snapshot.status === 'complete')
          add('no-manifest', mPath, 'the snapshot is complete but has no readable _manifest.json');
      }
      if (text !== undefined) {
        const parsed = manifestSchema.safeParse(parseJson(text));
        if (parsed.success) manifest = parsed.data;
        else add('no-manifest', mPath, `_manifest.json breaks its contract: ${contractProblems(parsed.error)}`);
      }
      const rows = new Map(
        (await runtime.store.listParts(exportId, snapshot.snapshotId))
          .map((r) => r.value)
          .filter((r) => r.status === 'landed')
          .map((r) => [r.landingPath, r]),
      );
      const expected = new Map<string, { bytes: number; md5: string | null }>();
      if (manifest) {
        for (const part of manifest.parts) expected.set(part.path, { bytes: part.bytes, md5: part.md5 });
        for (const [path, row] of rows) {
          const entry = expected.get(path);
          if (!entry) add('manifest-table-mismatch', path, 'landed in the parts table but not in _manifest.json');
          else if (entry.bytes !== row.bytes || (entry.md5 ?? undefined) !== row.md5) {
            add(
              'manifest-table-mismatch',
              path,
              `manifest ${entry.bytes} B/${entry.md5}, table ${row.bytes} B/${row.md5}`,
            );
          }
        }
        for (const path of expected.keys()) {
          if (!rows.has(path))
            add('manifest-table-mismatch', path, 'in _manifest.json but not landed in the parts table');
        }
      } else {
        for (const [path, row] of rows) expected.set(path, { bytes: row.bytes ?? 0, md5: row.md5 ?? null });
      }

      for (const [path, want] of expected) {
        const have = blobs.get(path);
        checked.blobs++;
        if (!have) {
          add('missing', path, 'listed but not in the landing container');
          continue;
        }
        if (have.bytes !== want.bytes) add('size-mismatch', path, `landed ${have.bytes} B, expected ${want.bytes} B`);
        let actualMd5 = have.md5;
        if (options.deep) {
          // Streamed: parts can be gigabytes.
          const download = await runtime.landing.getBlockBlobClient(path).download();
          const hash = createHash('md5');
          for await (const chunk of download.readableStreamBody ?? []) {
            const buffer = Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk as string);
            hash.update(buffer);
            checked.bytesHashed += buffer.length;
          }
          actualMd5 = hash.digest('base64');
        }
        if (want.md5 && actualMd5 && want.md5 !== actualMd5) {
          add('md5-mismatch', path, `landed MD5 ${actualMd5}, expected ${want.md5}`);
        }
        // The app always lands a part with its MD5: a blob without one was rewritten by something else (a block
        // upload sets none), and its bytes are unchecked. Only --deep can say what they are.
        if (want.md5 && !actualMd5) {
          add(
            'md5-mismatch',
            path,
            `the landed blob has no Content-MD5 (it was rewritten); expected ${want.md5}: run verify --deep to hash it`,
          );
        }
      }
      for (const path of blobs.keys()) {
        if (path !== mPath && !expected.has(path)) add('extra', path, 'in the snapshot folder but in no manifest');
      }
      if (manifest && snapshot.status === 'complete') {
        checked.blobs += await verifyDerived(runtime, manifest, isExportId(exportId) ? exportId : undefined, add);
      }
    }
  }
  // A snapshot id that no export has (a typo) must not pass as "0 snapshots, ok".
  if (options.snapshot && !snapshotFound && options.exports.length > 1) {
    findings.push({
      export: options.exports.join(','),
      snapshot: options.snapshot,
      kind: 'unknown-snapshot',
      path: '',
      detail: `no export in the snapshots table has a snapshot ${options.snapshot}`,
    });
  }
  return { v: 1, ok: findings.length === 0, deep: options.deep ?? false, checked, findings };
}

/**
 * Curated Parquet and change sets of one complete snapshot: the ones the settings turn on must exist, and every
 * derived manifest that exists must be made from the raw manifest now in place and list only what is there.
 */
async function verifyDerived(
  runtime: Runtime,
  raw: SnapshotManifest,
  exportId: ExportId | undefined,
  add: (kind: FindingKind, path: string, detail: string) => void,
): Promise<number> {
  let blobsChecked = 0;
  const digest = sourceDigest(raw.parts);
  const properties = async (path: string) =>
    runtime.landing
      .getBlobClient(path)
      .getProperties()
      .catch((error: unknown) => {
        if (isStorageCondition(error, 'not-found')) return undefined;
        throw error;
      });
  const read = async (path: string): Promise<unknown> => {
    if (!(await properties(path))) return undefined;
    return parseJson((await runtime.landing.getBlobClient(path).downloadToBuffer()).toString('utf8'));
  };
  const kinds = [
    {
      name: 'curated copy',
      path: curatedManifestPath(raw.export, raw.snapshot),
      on: exportId !== undefined && runtime.config.derive.curatedExports.includes(exportId),
      schema: curatedManifestSchema,
    },
    {
      name: 'change set',
      path: changesManifestPath(raw.export, raw.snapshot),
      on: exportId !== undefined && runtime.config.derive.changeSetExports.includes(exportId),
      schema: changeSetManifestSchema,
    },
  ] as const;
  for (const kind of kinds) {
    const value = await read(kind.path);
    if (value === undefined) {
      if (kind.on) add('derived-missing', kind.path, `no ${kind.name} yet; \`mdvm-ingest derive\` builds it`);
      continue;
    }
    const parsed = kind.schema.safeParse(value);
    if (!parsed.success) {
      add('derived-stale', kind.path, `breaks its contract: ${contractProblems(parsed.error)}`);
      continue;
    }
    if (parsed.data.sourceDigest !== digest) {
      add('derived-stale', kind.path, `made from another part list than the raw _manifest.json now has`);
      continue;
    }
    const listed =
      parsed.data.kind === 'curated'
        ? parsed.data.parts.map((p) => ({ path: p.path, bytes: p.bytes }))
        : [{ path: parsed.data.path, bytes: parsed.data.bytes }];
    for (const file of listed) {
      blobsChecked++;
      const have = await properties(file.path);
      if (!have) add('missing', file.path, `listed by ${kind.path} but not in the landing container`);
      else if (have.contentLength !== file.bytes) {
        add('size-mismatch', file.path, `landed ${have.contentLength} B, ${kind.path} says ${file.bytes} B`);
      }
    }
  }
  return blobsChecked;
}

/** Why `_latest.json` does not point at the newest complete snapshot (or a newer one), if it does not. */
async function latestProblem(runtime: Runtime, exportId: string, newest: string): Promise<string | undefined> {
  let text: string;
  try {
    text = (await runtime.landing.getBlockBlobClient(latestPath(exportId)).downloadToBuffer()).toString('utf8');
  } catch {
    return `missing or unreadable; the newest complete snapshot is ${newest}`;
  }
  const pointer = latestSchema.safeParse(parseJson(text));
  if (!pointer.success) return `breaks its contract: ${contractProblems(pointer.error)}`;
  if (compareGeneratedTime(pointer.data.generatedTime, newest) < 0) {
    return `points at ${pointer.data.generatedTime}, but ${newest} is complete`;
  }
  // Newer than the newest complete row is fine only if it leads to a manifest (one completed since the listing).
  return latestPointerProblem(runtime, exportId, pointer.data);
}
