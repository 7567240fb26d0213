import { describe, expect, it } from 'vitest';
import { z } from 'zod';
import {
  latestSchema,
  manifestSchema,
  PUBLISHED_CONTRACTS,
  partRowSchema,
  snapshotRowSchema,
} from '../../src/core/contracts.js';

const landedPart = {
  exportId: 'certificates',
  snapshotId: '2026-11-23T0601Z',
  path: 'OrgId=o/_RbacGroupId=1/part-00000.json.gz',
  sourcePath: 'https://ms.blob.core.windows.net/export/x/part-00000.json.gz',
  landingPath: 'certificates/snapshot=2026-11-23T0601Z/OrgId=o/_RbacGroupId=1/part-00000.json.gz',
  status: 'landed',
  attempts: 1,
  bytes: 1234,
  verification: 'md5',
  landedAt: '2026-11-23T07:00:00.000Z',
};

const manifest = {
  v: 1,
  export: 'certificates',
  exportTitle: 'Certificate inventory',
  snapshot: '2026-11-23T0601Z',
  generatedTime: '2026-11-23T06:01:00.000Z',
  completedAt: '2026-11-23T07:00:00.000Z',
  totals: { parts: 1, bytes: 1234, records: null },
  parts: [
    {
      path: landedPart.landingPath,
      part: landedPart.path,
      bytes: 1234,
      md5: null,
      records: null,
      verification: 'length',
    },
  ],
};

describe('contracts (the rows and blobs the pipeline writes)', () => {
  it('a landed part row must say how many bytes landed, when, and how they were checked', () => {
    expect(partRowSchema.safeParse(landedPart).success).toBe(true);
    for (const key of ['bytes', 'landedAt', 'verification'] as const) {
      const { [key]: _dropped, ...row } = landedPart;
      const result = partRowSchema.safeParse(row);
      expect(result.success, key).toBe(false);
      expect(result.error?.issues[0]?.path).toEqual([key]);
    }
    const { bytes: _b, landedAt: _l, verification: _v, ...queued } = landedPart;
    expect(partRowSchema.safeParse({ ...queued, status: 'queued' }).success).toBe(true);
  });

  it('a manifest whose totals disagree with its parts is refused', () => {
    expect(manifestSchema.safeParse(manifest).success).toBe(true);
    expect(manifestSchema.safeParse({ ...manifest, totals: { ...manifest.totals, bytes: 1 } }).success).toBe(false);
    expect(manifestSchema.safeParse({ ...manifest, totals: { ...manifest.totals, parts: 2 } }).success).toBe(false);
    expect(manifestSchema.safeParse({ ...manifest, parts: [{ ...manifest.parts[0], bytes: -1 }] }).success).toBe(false);
  });

  it('rows and pointers refuse unknown statuses and times that are not ISO 8601', () => {
    expect(snapshotRowSchema.safeParse({ exportId: 'x', status: 'done' }).success).toBe(false);
    const latest = {
      v: 1,
      export: 'certificates',
      snapshot: manifest.snapshot,
      generatedTime: manifest.generatedTime,
      manifest: 'certificates/snapshot=2026-11-23T0601Z/_manifest.json',
      updatedAt: '2026-11-23T07:00:00Z',
    };
    expect(latestSchema.safeParse(latest).success).toBe(true);
    expect(latestSchema.safeParse({ ...latest, generatedTime: 'yesterday' }).success).toBe(false);
  });

  // Regenerate after changing a schema: npx vitest run test/unit/contracts.test.ts -u
  it.each(Object.entries(PUBLISHED_CONTRACTS))(
    'docs/contracts/%s is generated from the zod schema',
    async (file, schema) => {
      const json = z.toJSONSchema(schema, { io: 'output', unrepresentable: 'any' });
      await expect(`${JSON.stringify(json, null, 2)}\n`).toMatchFileSnapshot(`../../docs/contracts/${file}`);
    },
  );
});
