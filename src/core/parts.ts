import { isLoopbackHost } from './config.js';
import { MdvmError } from './errors.js';
import { stripQuery } from './redact.js';

/**
 * A part file as Defender hands it out:
 *   https://<acct>.blob.core.windows.net/<container>/<yyyy-MM-dd>/<HHmm>/<ExportName>/json/<relativePath>?<SAS>
 * Its identity within a snapshot is `relativePath` (OrgId=…/_RbacGroupId=…/part-….json.gz): part file
 * names repeat across RBAC groups, so the file name alone is never a key.
 */
export interface SourcePart {
  /** `OrgId=…/_RbacGroupId=…/part-….json.gz`, validated segment by segment. */
  readonly relativePath: string;
  /** The source URL without its query: safe to log and store. */
  readonly sourcePath: string;
  readonly blobExportName: string;
  /** The URL's `<yyyy-MM-dd>/<HHmm>` segments, which Defender derives from generatedTime. */
  readonly exportFolder: string;
  /** SAS expiry (`se`), when the URL carries one. */
  readonly sasExpiresOn: Date | undefined;
}

const SOURCE_LAYOUT = /\/(\d{4}-\d{2}-\d{2})\/(\d{4})\/([A-Za-z0-9_-]+)\/json\/(.+)$/;
const SAFE_SEGMENT = /^[A-Za-z0-9=_.-]{1,200}$/;

export interface SourcePolicy {
  readonly sourceHostAllowlist: readonly string[];
  readonly allowLoopback: boolean;
}

export function hostAllowed(hostname: string, allowlist: readonly string[]): boolean {
  const host = hostname.toLowerCase();
  return allowlist.some((pattern) =>
    pattern.startsWith('*.') ? host.endsWith(pattern.slice(1)) && host.length > pattern.length - 1 : host === pattern,
  );
}

/**
 * Parse and police a source URL. A forged message must not turn the copier into an SSRF or
 * exfiltration tool, so only https URLs on allow-listed hosts pass (plus loopback http in the
 * local profile), and the path must have the documented layout with safe segments.
 */
export function parseSourceUrl(rawUrl: string, policy: SourcePolicy): SourcePart {
  let url: URL;
  try {
    url = new URL(rawUrl);
  } catch {
    throw new MdvmError('invalid-input', 'source URL is not a valid URL');
  }
  const loopback = policy.allowLoopback && isLoopbackHost(url.hostname);
  if (!loopback) {
    if (url.protocol !== 'https:') {
      throw new MdvmError(
        'invalid-input',
        `source URL refused: scheme ${url.protocol} is not https (${stripQuery(rawUrl)})`,
      );
    }
    if (!hostAllowed(url.hostname, policy.sourceHostAllowlist)) {
      throw new MdvmError(
        'invalid-input',
        `source URL refused: host ${url.hostname} is not in MDVM_SOURCE_HOST_ALLOWLIST (${policy.sourceHostAllowlist.join(', ')})`,
      );
    }
  } else if (url.protocol !== 'http:' && url.protocol !== 'https:') {
    throw new MdvmError('invalid-input', `source URL refused: scheme ${url.protocol}`);
  }
  if (url.username || url.password) throw new MdvmError('invalid-input', 'source URL refused: it carries credentials');
  const match = SOURCE_LAYOUT.exec(url.pathname);
  if (!match) {
    throw new MdvmError(
      'invalid-input',
      `source URL does not have the export layout <yyyy-MM-dd>/<HHmm>/<ExportName>/json/…: ${stripQuery(rawUrl)}`,
    );
  }
  const relativePath = validateRelativePath(match[4] ?? '');
  const se = url.searchParams.get('se');
  const sasExpiresOn = se ? new Date(se) : undefined;
  // A time before year 0 parses, but no row, message or ISO time can hold it: one such URL would stop every tick of
  // its snapshot at the row write. (One after 9999 is capped by the tick like any expiry too far ahead.)
  if (sasExpiresOn && !Number.isNaN(sasExpiresOn.getTime()) && sasExpiresOn.toISOString().startsWith('-')) {
    throw new MdvmError(
      'invalid-input',
      `source URL refused: its SAS expiry se=${(se ?? '').slice(0, 40)} is not a usable time`,
    );
  }
  return {
    relativePath,
    sourcePath: `${url.origin}${url.pathname}`,
    blobExportName: match[3] ?? '',
    exportFolder: `${match[1]}/${match[2]}`,
    sasExpiresOn: sasExpiresOn && !Number.isNaN(sasExpiresOn.getTime()) ? sasExpiresOn : undefined,
  };
}

/** Decode and check each segment; the result is safe to use in a landing blob name. */
export function validateRelativePath(encoded: string): string {
  const segments = encoded.split('/');
  if (segments.length > 6) throw new MdvmError('invalid-input', 'part path is too deep');
  const decoded = segments.map((segment) => {
    let s: string;
    try {
      s = decodeURIComponent(segment);
    } catch {
      throw new MdvmError('invalid-input', `part path segment is not valid percent-encoding: ${segment}`);
    }
    if (!SAFE_SEGMENT.test(s) || s === '.' || s === '..') {
      throw new MdvmError('invalid-input', `part path segment refused: '${s.slice(0, 80)}'`);
    }
    return s;
  });
  const file = decoded[decoded.length - 1] ?? '';
  if (!file.endsWith('.json.gz')) throw new MdvmError('invalid-input', `part file is not .json.gz: '${file}'`);
  return decoded.join('/');
}

/**
 * `2026-11-22T18:01:00Z` → `2026-11-22T1801Z`; seconds are kept when not zero, milliseconds when not zero
 * (`2026-11-22T18:01:00.500Z` → `2026-11-22T180100.500Z`): two different instants never share a snapshot id, so
 * they never share a folder.
 */
export function snapshotIdOf(generatedTime: string): string {
  const d = new Date(generatedTime);
  if (Number.isNaN(d.getTime()))
    throw new MdvmError('invalid-input', `generatedTime is not a date: '${generatedTime}'`);
  const iso = d.toISOString(); // yyyy-MM-ddTHH:mm:ss.sssZ
  const seconds = iso.slice(17, 19);
  const millis = iso.slice(20, 23);
  const tail = millis !== '000' ? `${seconds}.${millis}` : seconds !== '00' ? seconds : '';
  return `${iso.slice(0, 10)}T${iso.slice(11, 13)}${iso.slice(14, 16)}${tail}Z`;
}

/**
 * Canonical form of generatedTime, the snapshots table's RowKey: ISO 8601 UTC, milliseconds only when not zero.
 * Every spelling of one instant maps to it. Order snapshots with compareGeneratedTime, never as strings
 * (`…00.500Z` sorts before `…00Z` as text).
 */
export function canonicalGeneratedTime(generatedTime: string): string {
  const d = new Date(generatedTime);
  if (Number.isNaN(d.getTime()))
    throw new MdvmError('invalid-input', `generatedTime is not a date: '${generatedTime}'`);
  return d.toISOString().replace('.000Z', 'Z');
}

/** Orders two generatedTimes by the instant they name. */
export function compareGeneratedTime(a: string, b: string): number {
  return Date.parse(a) - Date.parse(b);
}

/** The `<yyyy-MM-dd>/<HHmm>` folder Defender files a snapshot's parts under, from its generatedTime. */
export function exportFolderOf(generatedTime: string): string {
  const iso = new Date(generatedTime).toISOString();
  return `${iso.slice(0, 10)}/${iso.slice(11, 13)}${iso.slice(14, 16)}`;
}

/** Azure's limits that a part's names must fit: a blob name, and a table key (1 KiB of UTF-16). */
export const MAX_BLOB_NAME_LENGTH = 1_024;
export const MAX_TABLE_KEY_LENGTH = 512;

/** Why a part cannot be recorded and landed under these names, or undefined when it can. */
export function namesTooLong(exportId: string, snapshotId: string, relativePath: string): string | undefined {
  const blobName = landingPath(exportId, snapshotId, relativePath);
  if (blobName.length > MAX_BLOB_NAME_LENGTH) {
    return `its landing blob name would be ${blobName.length} characters (Azure allows ${MAX_BLOB_NAME_LENGTH})`;
  }
  const rowKey = encodeKey(relativePath);
  if (rowKey.length > MAX_TABLE_KEY_LENGTH) {
    return `its table key would be ${rowKey.length} characters (Azure allows ${MAX_TABLE_KEY_LENGTH})`;
  }
  return undefined;
}

export function snapshotFolder(exportId: string, snapshotId: string): string {
  return `${exportId}/snapshot=${snapshotId}`;
}

export function landingPath(exportId: string, snapshotId: string, relativePath: string): string {
  return `${snapshotFolder(exportId, snapshotId)}/${relativePath}`;
}

export function manifestPath(exportId: string, snapshotId: string): string {
  return `${snapshotFolder(exportId, snapshotId)}/_manifest.json`;
}

export function latestPath(exportId: string): string {
  return `${exportId}/_latest.json`;
}

/** Table keys may not contain / \ # ? or control characters: percent-encode (reversible). */
export function encodeKey(value: string): string {
  return encodeURIComponent(value);
}

export function decodeKey(value: string): string {
  return decodeURIComponent(value);
}

export function partsPartitionKey(exportId: string, snapshotId: string): string {
  return `${exportId}_${snapshotId}`;
}
