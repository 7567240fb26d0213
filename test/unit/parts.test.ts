import { describe, expect, it } from 'vitest';
import { EXPORT_TYPES } from '../../src/core/catalog.js';
import { MdvmError } from '../../src/core/errors.js';
import {
  canonicalGeneratedTime,
  compareGeneratedTime,
  decodeKey,
  encodeKey,
  landingPath,
  parseSourceUrl,
  snapshotIdOf,
} from '../../src/core/parts.js';

const policy = { sourceHostAllowlist: ['*.blob.core.windows.net'], allowLoopback: false };
const url = (host: string, rest = '', scheme = 'https') =>
  `${scheme}://${host}/temp-3c9a/2026-11-22/1801/VaExport/json/OrgId=5f0c1e2a-7b3d/_RbacGroupId=12/part-00000-4e1d7b90.c000.json.gz${rest}?sv=2020-08-04&se=2026-11-23T00%3A24%3A10Z&sr=b&sp=r&sig=ZmFrZQ%3D%3D`;

function refused(fn: () => unknown): string {
  try {
    fn();
  } catch (error) {
    expect(error).toBeInstanceOf(MdvmError);
    expect((error as MdvmError).kind).toBe('invalid-input');
    return (error as Error).message;
  }
  throw new Error('expected a refusal');
}

describe('export catalog', () => {
  it('has the nine via-files export types with unique ids and documented casing', () => {
    expect(EXPORT_TYPES).toHaveLength(9);
    expect(new Set(EXPORT_TYPES.map((t) => t.id)).size).toBe(9);
    expect(EXPORT_TYPES.map((t) => t.apiPath)).toContain('/api/machines/browserextensionsinventoryExport');
    expect(EXPORT_TYPES.map((t) => t.apiPath)).toContain('/api/Machines/InfoGatheringExport');
    expect(EXPORT_TYPES.find((t) => t.id === 'certificates')?.sasMaxHours).toBe(24);
    expect(EXPORT_TYPES.find((t) => t.id === 'security-baselines')?.permission).toBe(
      'SecurityBaselinesAssessment.Read.All',
    );
  });
});

describe('source URLs', () => {
  it('takes the part identity from the path after <date>/<HHmm>/<ExportName>/json/', () => {
    const part = parseSourceUrl(url('tvmexportexternalprdeus.blob.core.windows.net'), policy);
    expect(part.relativePath).toBe('OrgId=5f0c1e2a-7b3d/_RbacGroupId=12/part-00000-4e1d7b90.c000.json.gz');
    expect(part.blobExportName).toBe('VaExport');
    expect(part.sasExpiresOn?.toISOString()).toBe('2026-11-23T00:24:10.000Z');
    expect(part.sourcePath).not.toContain('sig=');
    expect(part.sourcePath).not.toContain('?');
  });

  it('keeps the same file name under two RBAC groups apart', () => {
    const a = parseSourceUrl(url('x.blob.core.windows.net'), policy);
    const b = parseSourceUrl(url('x.blob.core.windows.net').replace('_RbacGroupId=12', '_RbacGroupId=31'), policy);
    expect(a.relativePath).not.toBe(b.relativePath);
    expect(encodeKey(a.relativePath)).not.toBe(encodeKey(b.relativePath));
  });

  it('refuses hosts outside the allowlist, plain http and look-alike hosts', () => {
    expect(refused(() => parseSourceUrl(url('evil.example.com'), policy))).toMatch(/not in MDVM_SOURCE_HOST_ALLOWLIST/);
    expect(refused(() => parseSourceUrl(url('x.blob.core.windows.net', '', 'http'), policy))).toMatch(/not https/);
    expect(refused(() => parseSourceUrl(url('blob.core.windows.net.evil.com'), policy))).toMatch(/allowlist/i);
    expect(refused(() => parseSourceUrl(url('127.0.0.1:10000', '', 'http'), policy))).toMatch(/not https/);
    expect(refused(() => parseSourceUrl(url('169.254.169.254'), policy))).toMatch(/allowlist/i);
    expect(refused(() => parseSourceUrl('file:///etc/passwd', policy))).toMatch(/not https/);
  });

  it('accepts loopback http only in the local profile', () => {
    const local = { ...policy, allowLoopback: true };
    expect(parseSourceUrl(url('127.0.0.1:10000', '', 'http'), local).relativePath).toMatch(/^OrgId=/);
    expect(refused(() => parseSourceUrl(url('evil.example.com'), local))).toMatch(/allowlist/i);
  });

  it('refuses paths that could escape the snapshot folder or are not part files', () => {
    const host = 'https://x.blob.core.windows.net/c/2026-11-22/1801/VaExport/json';
    expect(refused(() => parseSourceUrl(`${host}/OrgId=1/../../x.json.gz?sig=a`, policy))).toMatch(/refused|layout/);
    // The URL parser resolves encoded dot segments first: what is left stays inside the folder.
    expect(parseSourceUrl(`${host}/OrgId=1/%2e%2e/x.json.gz?sig=a`, policy).relativePath).toBe('x.json.gz');
    expect(refused(() => parseSourceUrl(`${host}/OrgId=1/%252e%252e/x.json.gz?sig=a`, policy))).toMatch(/refused/);
    expect(refused(() => parseSourceUrl(`${host}/OrgId=1/a%2Fb.json.gz?sig=a`, policy))).toMatch(/refused/);
    expect(refused(() => parseSourceUrl(`${host}/OrgId=1/part-0.csv?sig=a`, policy))).toMatch(/json\.gz/);
    expect(refused(() => parseSourceUrl('https://x.blob.core.windows.net/c/other/layout.json.gz', policy))).toMatch(
      /layout/,
    );
  });
});

describe('snapshot ids and landing paths', () => {
  it('formats generatedTime Hive-style and sortable', () => {
    expect(snapshotIdOf('2026-11-22T18:01:00Z')).toBe('2026-11-22T1801Z');
    expect(snapshotIdOf('2026-11-22T18:01:30Z')).toBe('2026-11-22T180130Z');
    expect(snapshotIdOf('2026-11-22T19:01:00+01:00')).toBe('2026-11-22T1801Z');
    expect(canonicalGeneratedTime('2026-11-22T18:01:00.000Z')).toBe('2026-11-22T18:01:00Z');
    expect(() => snapshotIdOf('yesterday')).toThrow(MdvmError);
  });

  it('gives two different instants two different snapshot ids and orders them as instants, not as text', () => {
    const whole = '2026-11-22T18:01:00Z';
    const half = '2026-11-22T18:01:00.500Z';
    expect(snapshotIdOf(whole)).toBe('2026-11-22T1801Z');
    expect(snapshotIdOf(half)).toBe('2026-11-22T180100.500Z');
    expect(snapshotIdOf('2026-11-22T18:01:00.000Z')).toBe(snapshotIdOf(whole));
    expect(canonicalGeneratedTime(half)).toBe(half);
    // As text the later instant sorts first ('.' < 'Z'); as instants it does not.
    expect(half < whole).toBe(true);
    expect(compareGeneratedTime(half, whole)).toBeGreaterThan(0);
    expect([half, whole].sort(compareGeneratedTime)).toEqual([whole, half]);
    expect(() => canonicalGeneratedTime('not a time')).toThrow(MdvmError);
  });

  it('builds the contract landing path and reversible table keys', () => {
    const rel = 'OrgId=o/_RbacGroupId=12/part-00000-j.c000.json.gz';
    expect(landingPath('software-vulnerabilities', '2026-11-22T1801Z', rel)).toBe(
      'software-vulnerabilities/snapshot=2026-11-22T1801Z/OrgId=o/_RbacGroupId=12/part-00000-j.c000.json.gz',
    );
    const key = encodeKey(rel);
    expect(key).not.toMatch(/[/\\#?]/);
    expect(decodeKey(key)).toBe(rel);
  });
});
