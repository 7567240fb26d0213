import { readdirSync, readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { DELTA_EXPORT, EXPORT_TYPES, type LandedExportId } from '../../src/core/catalog.js';
import { ROW_GROUP_RAW_BYTES, ROW_GROUP_ROWS, rowGroupFull } from '../../src/derive/curate.js';
import {
  dataExplorerScript,
  INGESTION_MAPPING_NAME,
  RAW_RECORD_COLUMN,
  rawTableName,
  SOURCE_PATH_COLUMN,
} from '../../src/derive/kusto.js';
import { parseDefenderTime, recordNormaliser } from '../../src/derive/normalise.js';
import { ADDITIONAL_PROPERTIES, camelKey, RECORD_SCHEMAS, recordSchema } from '../../src/derive/schemas.js';
import { checkKustoAgainst } from '../infra/kustoCheck.js';

/**
 * The downstream schemas against the sample records of every export type, in the casing of the documented examples and
 * in the other one (the first letter of every key flipped, as files read by third-party code report it).
 */
const FIXTURES = new URL('../fixtures/records/', import.meta.url);
const ALL_IDS = [...EXPORT_TYPES.map((t) => t.id), DELTA_EXPORT.id] as LandedExportId[];

function endpointOf(id: LandedExportId): string {
  const type = EXPORT_TYPES.find((t) => t.id === id);
  return (type ? type.apiPath : DELTA_EXPORT.apiPath).split('/').at(-1) ?? '';
}

function samples(id: LandedExportId): Record<string, unknown>[] {
  const file = readdirSync(FIXTURES).find((f) => f.toLowerCase() === `${endpointOf(id).toLowerCase()}.sample.jsonl`);
  if (!file) throw new Error(`no sample records for ${id}`);
  return readFileSync(new URL(file, FIXTURES), 'utf8')
    .split('\n')
    .filter((line) => line.trim() !== '')
    .map((line) => JSON.parse(line) as Record<string, unknown>);
}

const flipFirst = (key: string): string =>
  key.charAt(0) === key.charAt(0).toUpperCase()
    ? key.charAt(0).toLowerCase() + key.slice(1)
    : key.charAt(0).toUpperCase() + key.slice(1);
const recased = (record: Record<string, unknown>, recase: (k: string) => string) =>
  Object.fromEntries(Object.entries(record).map(([k, v]) => [recase(k), v]));
const CASINGS = {
  'as documented': (k: string) => k,
  'first letter flipped': flipFirst,
  camelCase: camelKey,
} as const;

/** Column name to the exact keys its projection reads, taken from the generated script itself. */
function projectedKeys(script: string): Map<string, string[]> {
  const out = new Map<string, string[]>();
  for (const m of script.matchAll(/^ {4}([A-Za-z]+) = (.*),$/gm)) {
    const keys = [...(m[2] ?? '').matchAll(new RegExp(`${RAW_RECORD_COLUMN}\\['([^']+)'\\]`, 'g'))].map((k) => k[1]);
    if (m[1] !== ADDITIONAL_PROPERTIES) out.set(m[1] ?? '', keys as string[]);
  }
  return out;
}

describe('Data Explorer scripts', () => {
  it.each(ALL_IDS)('docs/downstream/data-explorer/%s.kql is generated from the record schema', async (id) => {
    await expect(dataExplorerScript(recordSchema(id))).toMatchFileSnapshot(
      `../../docs/downstream/data-explorer/${id}.kql`,
    );
  });

  it.each(ALL_IDS)('%s: every command parses and binds in the Kusto language service', (id) => {
    const schema = recordSchema(id);
    const raw = rawTableName(schema);
    const tables = {
      [raw]: [
        [RAW_RECORD_COLUMN, 'dynamic'],
        [SOURCE_PATH_COLUMN, 'string'],
      ] as const,
      // Created by the script's own third command.
      [schema.table]: [
        ...schema.columns.map((c) => [c.name, c.type] as const),
        [ADDITIONAL_PROPERTIES, 'dynamic'] as const,
        [SOURCE_PATH_COLUMN, 'string'] as const,
      ],
    };
    const commands = dataExplorerScript(schema)
      .split('\n\n')
      .filter((c) => c.startsWith('.'));
    expect(commands).toHaveLength(5);
    for (const command of commands) expect(checkKustoAgainst(command, tables), command.slice(0, 80)).toEqual([]);
    // The checker is not blind: a broken body in the function command is reported.
    const fn = commands.find((c) => c.startsWith('.create-or-alter function')) ?? '';
    expect(checkKustoAgainst(fn.replace(`${raw}\n`, `${raw}X\n`), tables)).not.toEqual([]);
    expect(checkKustoAgainst(fn.replace('tostring(', 'tostrng('), tables)).not.toEqual([]);
  });

  it.each(ALL_IDS)('%s: the ingestion mapping lands each line whole with its source path', (id) => {
    const script = dataExplorerScript(recordSchema(id));
    const m = /ingestion json mapping "([^"]+)" '([^']+)'/.exec(script);
    expect(m?.[1]).toBe(INGESTION_MAPPING_NAME);
    expect(JSON.parse(m?.[2] ?? '')).toEqual([
      { column: RAW_RECORD_COLUMN, Properties: { Path: '$' } },
      { column: SOURCE_PATH_COLUMN, Properties: { Transform: 'SourceLocation' } },
    ]);
  });

  it.each(ALL_IDS)('%s: every sample key, in either casing, is read by exactly one typed column', (id) => {
    const columns = projectedKeys(dataExplorerScript(recordSchema(id)));
    expect(columns.size).toBe(recordSchema(id).columns.length);
    for (const [casing, recase] of Object.entries(CASINGS)) {
      for (const record of samples(id)) {
        for (const key of Object.keys(recased(record, recase))) {
          const readers = [...columns].filter(([, keys]) => keys.includes(key)).map(([c]) => c);
          expect(readers, `${casing}: ${key}`).toHaveLength(1);
        }
      }
    }
  });
});

describe('docs/downstream/README.md', () => {
  const doc = readFileSync(new URL('../../docs/downstream/README.md', import.meta.url), 'utf8');

  it('lists the key and tracked columns of every export type exactly as the schemas define them', () => {
    const rows = new Map(
      [...doc.matchAll(/^\| `([a-z-]+)` \| ([^|]+) \| ([^|]+) \|$/gm)].map((m) => [m[1], [m[2]?.trim(), m[3]?.trim()]]),
    );
    for (const id of ALL_IDS) {
      const schema = recordSchema(id);
      const [key, tracked] = rows.get(id) ?? [];
      expect(key, id).toBe(schema.keyColumns.join(', '));
      const listed = tracked?.startsWith('—') || tracked?.startsWith('(') ? [] : (tracked ?? '').split(', ');
      expect(listed, id).toEqual(schema.trackedColumns);
    }
  });

  it('every Kusto example parses and binds against the tables the scripts create', () => {
    const tables: Record<string, (readonly [string, string])[]> = {};
    for (const id of ALL_IDS) {
      const schema = recordSchema(id);
      tables[rawTableName(schema)] = [
        [RAW_RECORD_COLUMN, 'dynamic'],
        [SOURCE_PATH_COLUMN, 'string'],
      ];
      tables[schema.table] = [
        ...schema.columns.map((c) => [c.name, c.type] as const),
        [ADDITIONAL_PROPERTIES, 'dynamic'],
        [SOURCE_PATH_COLUMN, 'string'],
      ];
    }
    const blocks = [...doc.matchAll(/```kusto\n([\s\S]*?)```/g)].map((m) => m[1] ?? '');
    expect(blocks.length).toBeGreaterThanOrEqual(2);
    for (const block of blocks) expect(checkKustoAgainst(block, tables), block).toEqual([]);
  });
});

describe('record normaliser (curated columns)', () => {
  it.each(ALL_IDS)('%s: sample records give the same typed row in every casing, nothing left over', (id) => {
    const normaliser = recordNormaliser(recordSchema(id));
    for (const record of samples(id)) {
      const rows = Object.values(CASINGS).map((recase) => normaliser.normalise(recased(record, recase)));
      for (const row of rows.slice(1)) expect(row).toEqual(rows[0]);
      const row = rows[0] ?? {};
      expect(row[ADDITIONAL_PROPERTIES]).toBeNull();
      // Every value that was there is there, typed: no conversion fell back to AdditionalProperties.
      const present = Object.values(record).filter((v) => v !== null).length;
      const filled = recordSchema(id).columns.filter((c) => row[c.name] !== null).length;
      const sentinels = Object.values(record).filter((v) => v === '0001-01-01T00:00:00Z').length;
      expect(filled).toBe(present - sentinels);
    }
  });

  it.each(ALL_IDS)('%s: key columns are present in every sample and identify each record', (id) => {
    const schema = recordSchema(id);
    const normaliser = recordNormaliser(schema);
    const keys = samples(id).map((r) => {
      const row = normaliser.normalise(r);
      // CveId may be null (software rows without a CVE); the device never is.
      expect(row.DeviceId).toEqual(expect.any(String));
      return JSON.stringify(schema.keyColumns.map((c) => row[c]));
    });
    expect(new Set(keys).size).toBe(keys.length);
    for (const name of [...schema.keyColumns, ...schema.trackedColumns]) {
      expect(schema.columns.map((c) => c.name)).toContain(name);
    }
  });

  it('converts types and keeps what does not convert', () => {
    const normaliser = recordNormaliser(RECORD_SCHEMAS['secure-configuration']);
    const row = normaliser.normalise({
      DEVICEID: 'd1',
      configurationImpact: '7',
      isCompliant: 'False',
      rbacGroupId: 'n/a',
      timestamp: '2021-01-11 09:47:58.854',
      brandNewField: { a: 1 },
    });
    expect(row.DeviceId).toBe('d1');
    expect(row.ConfigurationImpact).toBe(7);
    expect(row.IsCompliant).toBe(false);
    expect(row.RbacGroupId).toBeNull();
    expect(row.Timestamp).toEqual(new Date('2021-01-11T09:47:58.854Z'));
    expect(row[ADDITIONAL_PROPERTIES]).toEqual({ rbacGroupId: 'n/a', brandNewField: { a: 1 } });
    const firmware = recordNormaliser(RECORD_SCHEMAS['hardware-firmware']).normalise({
      additionalFields: '{"SystemSKU":"X"}',
    });
    expect(firmware.AdditionalFields).toEqual({ SystemSKU: 'X' });
  });

  it('keeps a key named __proto__ and a second spelling of a filled field in AdditionalProperties', () => {
    const certificates = recordNormaliser(RECORD_SCHEMAS.certificates);
    const row = certificates.normalise(
      JSON.parse('{"deviceId":"d","keyLength":2048,"KeySize":4096,"__proto__":{"x":1}}'),
    );
    expect(row.KeyLength).toBe(2048);
    expect(JSON.parse(JSON.stringify(row[ADDITIONAL_PROPERTIES]))).toEqual(
      JSON.parse('{"KeySize":4096,"__proto__":{"x":1}}'),
    );
    expect(Object.keys(row[ADDITIONAL_PROPERTIES] as object)).toEqual(['KeySize', '__proto__']);
  });

  it.each([
    ['2020-12-30 14:17:26', '2020-12-30T14:17:26.000Z'],
    ['2021-01-11 09:47:58.854', '2021-01-11T09:47:58.854Z'],
    ['2020-11-03 10:13:34.8476880', '2020-11-03T10:13:34.847Z'],
    ['2021-12-22T00:08:02.478Z', '2021-12-22T00:08:02.478Z'],
    ['2021-05-11T00:00:00+00:00', '2021-05-11T00:00:00.000Z'],
    ['2021-05-11T02:00:00+02:00', '2021-05-11T00:00:00.000Z'],
    ['2026-07-09', '2026-07-09T00:00:00.000Z'],
  ])('reads Defender time %s', (text, iso) => {
    expect(parseDefenderTime(text)?.toISOString()).toBe(iso);
  });

  it('reads the 0001-01-01 sentinel as no date and refuses what is not a time', () => {
    expect(parseDefenderTime('0001-01-01T00:00:00Z')).toBeNull();
    expect(parseDefenderTime('2021-02-30 10:00:00')).toBeUndefined();
    expect(parseDefenderTime('yesterday')).toBeUndefined();
  });

  it.each([
    '2020-12-30 14:17:99',
    '2020-12-30 14:17:60',
    '2020-12-30T14:17:26+01:99',
    '2020-12-30T14:17:26-0060',
    '2020-12-30T14:17:26+24:00',
  ])('refuses %s (a field out of range is not carried into the next one)', (text) => {
    expect(parseDefenderTime(text)).toBeUndefined();
    const certificates = recordNormaliser(RECORD_SCHEMAS.certificates);
    const row = certificates.normalise({ deviceId: 'd', notAfter: text });
    expect(row.NotAfter).toBeNull();
    expect(row[ADDITIONAL_PROPERTIES]).toEqual({ notAfter: text });
  });

  it('reads the last second and the widest offsets of a day', () => {
    expect(parseDefenderTime('2020-12-30 23:59:59')?.toISOString()).toBe('2020-12-30T23:59:59.000Z');
    expect(parseDefenderTime('2020-12-30T14:00:00+14:00')?.toISOString()).toBe('2020-12-30T00:00:00.000Z');
    expect(parseDefenderTime('2020-12-30T14:00:00-09:59')?.toISOString()).toBe('2020-12-30T23:59:00.000Z');
  });
});

describe('curated row groups', () => {
  it('are cut at 5,000 rows or when their raw JSON reaches 16 MiB, whichever comes first', () => {
    expect(ROW_GROUP_ROWS).toBe(5000);
    expect(ROW_GROUP_RAW_BYTES).toBe(16 * 1024 * 1024);
    expect(rowGroupFull(4999, 1024 * 4999)).toBe(false);
    expect(rowGroupFull(5000, 1024 * 5000)).toBe(true);
    expect(rowGroupFull(273, 273 * 60 * 1024)).toBe(false);
    expect(rowGroupFull(274, 274 * 60 * 1024)).toBe(true);
    expect(rowGroupFull(1, 40 * 1024 * 1024)).toBe(true);
  });
});
