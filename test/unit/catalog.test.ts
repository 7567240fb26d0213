import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { DEFENDER_PERMISSIONS, EXPORT_TYPES } from '../../src/core/catalog.js';
import { parseExportList } from '../../src/core/config.js';

/** Everything that lists export types or permissions outside the code is checked against the catalog. */
const readme = readFileSync(new URL('../../README.md', import.meta.url), 'utf8');
const tableRows = (headerStart: string) => {
  const lines = readme.split('\n');
  const start = lines.findIndex((l) => l.startsWith(headerStart));
  expect(start, `README has no table starting '${headerStart}'`).toBeGreaterThanOrEqual(0);
  const rows: string[][] = [];
  for (const line of lines.slice(start + 2)) {
    if (!line.startsWith('|')) break;
    rows.push(
      line
        .split('|')
        .slice(1, -1)
        .map((cell) => cell.trim().replace(/^`|`$/g, '')),
    );
  }
  return rows;
};

describe('the catalog is the one list of export types', () => {
  it('README "Export types" is the catalog, row for row', () => {
    expect(tableRows('| id | title | API path')).toEqual(
      EXPORT_TYPES.map((t) => [
        t.id,
        t.title,
        t.apiPath,
        t.blobExportName,
        t.permission,
        String(t.sasMaxHours),
        String(t.sasDefaultHours),
      ]),
    );
  });

  it('README "Defender API permissions" gives each permission exactly the types that need it', () => {
    const rows = tableRows('| permission | export types |');
    expect(rows.map((r) => r[0])).toEqual([...DEFENDER_PERMISSIONS]);
    for (const [permission, types] of rows) {
      const listed = (types ?? '').split(/`,\s*`/).map((t) => t.replace(/`/g, ''));
      expect(listed, permission).toEqual(EXPORT_TYPES.filter((t) => t.permission === permission).map((t) => t.id));
    }
  });

  it('the grant script grants exactly the permissions the catalog needs', () => {
    const script = readFileSync(new URL('../../infra/scripts/grant-defender-permissions.mjs', import.meta.url), 'utf8');
    const roles = script.match(/^const ROLES = (\[.*\]);$/m)?.[1];
    expect(JSON.parse((roles ?? '[]').replace(/'/g, '"'))).toEqual([...DEFENDER_PERMISSIONS]);
  });

  it('MDVM_EXPORTS and --exports share one parser', () => {
    expect(parseExportList('all')).toEqual({ exports: EXPORT_TYPES.map((t) => t.id) });
    expect(parseExportList(' certificates , certificates,hardware-firmware ')).toEqual({
      exports: ['certificates', 'hardware-firmware'],
    });
    expect(parseExportList('certificates,nope')).toMatchObject({ problem: expect.stringMatching(/'nope'/) });
    expect(parseExportList(' , ')).toMatchObject({ problem: expect.stringMatching(/\(empty\)/) });
  });
});
