import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { gunzipSync } from 'node:zlib';
import { DuckDBInstance } from '@duckdb/node-api';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { latestSchema, manifestSchema, type SnapshotManifest } from '../../src/core/contracts.js';
import { createApp, md5, type Stack, startStack, type TestApp } from '../helpers/stack.js';

let stack: Stack;
let folder: string;
beforeAll(async () => {
  stack = await startStack();
  folder = mkdtempSync(join(tmpdir(), 'mdvm-downstream-'));
});
afterAll(async () => {
  await stack?.stop();
  rmSync(folder, { recursive: true, force: true });
});

/**
 * What a downstream job does, using nothing but the contract: `_latest.json` names the manifest, the manifest names
 * the parts (with length and MD5). The parts are fetched into a local folder for the engine (DuckDB's own Azure
 * reader is an extension it would download; this machine has no internet).
 */
async function fetchSnapshot(app: TestApp, exportId: string): Promise<{ manifest: SnapshotManifest; files: string[] }> {
  const read = async (name: string) => app.runtime.landing.getBlobClient(name).downloadToBuffer();
  const latest = latestSchema.parse(JSON.parse((await read(`${exportId}/_latest.json`)).toString()));
  const manifest = manifestSchema.parse(JSON.parse((await read(latest.manifest)).toString()));
  const files: string[] = [];
  for (const part of manifest.parts) {
    const body = await read(part.path);
    expect(md5(body)).toBe(part.md5);
    const file = join(folder, part.path);
    mkdirSync(dirname(file), { recursive: true });
    writeFileSync(file, body);
    files.push(file);
  }
  return { manifest, files };
}

const sqlList = (files: readonly string[]) => `[${files.map((f) => `'${f.replaceAll("'", "''")}'`).join(', ')}]`;

describe('a real engine reads what we land, following only the contract', () => {
  it('DuckDB counts the manifest records per part, and joins vulnerabilities with software inventory by device', async () => {
    const app = await createApp(stack, {
      MDVM_EXPORTS: 'software-vulnerabilities,software-inventory',
      MDVM_COPY_MODE: 'stream',
      MDVM_COUNT_RECORDS: 'true',
    });
    for (const id of ['software-vulnerabilities', 'software-inventory'] as const) {
      await stack.simulator.publish(id, { generatedTime: '2026-11-21T06:01:00Z', recordsPerPart: 40 });
    }
    await app.runner.tick();
    await app.runner.drain();

    const vulnerabilities = await fetchSnapshot(app, 'software-vulnerabilities');
    const inventory = await fetchSnapshot(app, 'software-inventory');
    const db = await DuckDBInstance.create(':memory:');
    const sql = await db.connect();
    try {
      for (const { manifest, files } of [vulnerabilities, inventory]) {
        const counted = await sql.runAndReadAll(
          `select filename, count(*)::INTEGER as n from read_json(${sqlList(files)}, format = 'newline_delimited', filename = true) group by filename`,
        );
        const perFile = new Map(counted.getRowObjectsJS().map((r) => [String(r.filename), Number(r.n)]));
        expect(manifest.totals.records).toBeGreaterThan(0);
        for (const [i, part] of manifest.parts.entries()) expect(perFile.get(files[i] ?? '') ?? 0).toBe(part.records);
      }

      // The same join computed from the landed lines, without the engine.
      const lines = (files: readonly string[]) =>
        files.flatMap((f) =>
          gunzipSync(readFileSync(f))
            .toString('utf8')
            .split('\n')
            .filter((l) => l !== '')
            .map((l) => JSON.parse(l) as Record<string, unknown>),
        );
      const key = (r: Record<string, unknown>) =>
        [r.deviceId, r.softwareVendor, r.softwareName, r.softwareVersion].join('|');
      const installed = new Map<string, number>();
      for (const r of lines(inventory.files)) installed.set(key(r), (installed.get(key(r)) ?? 0) + 1);
      const expected = lines(vulnerabilities.files).reduce((sum, r) => sum + (installed.get(key(r)) ?? 0), 0);
      expect(expected).toBeGreaterThan(0);

      const joined = await sql.runAndReadAll(`
        with v as (select * from read_json(${sqlList(vulnerabilities.files)}, format = 'newline_delimited')),
             s as (select * from read_json(${sqlList(inventory.files)}, format = 'newline_delimited'))
        select count(*)::INTEGER as n, count(distinct v.deviceId)::INTEGER as devices
        from v join s
          on v.deviceId = s.deviceId and v.softwareVendor = s.softwareVendor
         and v.softwareName = s.softwareName and v.softwareVersion = s.softwareVersion`);
      const [row] = joined.getRowObjectsJS();
      expect(Number(row?.n)).toBe(expected);
      expect(Number(row?.devices)).toBeGreaterThan(1);
    } finally {
      sql.closeSync();
    }
  });
});
