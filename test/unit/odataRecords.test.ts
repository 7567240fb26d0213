import { readFileSync } from 'node:fs';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { describe, expect, it } from 'vitest';
import { ODataRecordsTransform } from '../../src/core/odataRecords.js';

/** Feed `text` in chunks of `size` bytes; the JSON Lines out, and the transform for its nextLink. */
async function scan(text: string | Buffer, size = 7, options = {}) {
  const bytes = Buffer.isBuffer(text) ? text : Buffer.from(text);
  const chunks: Buffer[] = [];
  for (let i = 0; i < bytes.length; i += size) chunks.push(bytes.subarray(i, i + size));
  const transform = new ODataRecordsTransform(options);
  const out: Buffer[] = [];
  await pipeline(Readable.from(chunks), transform, async (source: AsyncIterable<Buffer>) => {
    for await (const piece of source) out.push(piece);
  });
  return { lines: Buffer.concat(out).toString('utf8'), transform };
}

const samples = new URL('../fixtures/', import.meta.url);

describe('ODataRecordsTransform (a Defender JSON page to JSON Lines, streaming)', () => {
  it('turns the documented delta page into its records, one compact line each, and keeps the nextLink verbatim', async () => {
    const page = readFileSync(new URL('SoftwareVulnerabilityChangesByMachine.response.json', samples), 'utf8');
    const parsed = JSON.parse(page) as { value: unknown[]; '@odata.nextLink': string; '@odata.context': string };
    const { lines, transform } = await scan(page, 13);
    const records = lines.trimEnd().split('\n');
    expect(records.map((l) => JSON.parse(l))).toEqual(parsed.value);
    expect(records.every((l) => !/\s{2}|\n/.test(l.replace(/"(?:[^"\\]|\\.)*"/g, '""')))).toBe(true);
    expect(transform.records).toBe(parsed.value.length);
    expect(transform.nextLink).toBe(parsed['@odata.nextLink']);
    expect(transform.context).toBe(parsed['@odata.context']);
  });

  it('gives the same lines whatever the chunk boundaries, with quotes, brackets and escapes inside strings', async () => {
    const records = [
      { id: 'a"}]{[', path: 'C:\\Program Files\\x\\', note: 'two  spaces\tand\ttabs', n: -1.5e3, ok: true, none: null },
      { nested: { list: [1, [2, { deep: '}' }]], empty: {} }, unicode: 'é 日本 \u2028 😀', esc: '\\"' },
      {},
    ];
    const text = `  {\n "@odata.nextLink" : "https://h/api/x?$skiptoken=a\\"b",\n "value" : [\n${records
      .map((r) => JSON.stringify(r, null, 3))
      .join(' ,\n')}\n ], "@odata.count": 3, "extra": {"value": [1]} }\n`;
    const expected = `${records.map((r) => JSON.stringify(r)).join('\n')}\n`;
    for (const size of [1, 2, 3, 5, 64, text.length]) {
      const { lines, transform } = await scan(text, size);
      expect(lines, `chunks of ${size}`).toBe(expected);
      expect(transform.nextLink).toBe('https://h/api/x?$skiptoken=a"b');
      expect(transform.records).toBe(3);
    }
  });

  it('an empty page has no records and no nextLink', async () => {
    const { lines, transform } = await scan('{"@odata.context":"c","value":[]}');
    expect(lines).toBe('');
    expect(transform.records).toBe(0);
    expect(transform.nextLink).toBeUndefined();
  });

  it.each([
    ['a truncated page', '{"value":[{"a":1},{"b":', /truncated/],
    ['an empty body', '', /empty response/],
    ['not an object', '[{"a":1}]', /not a JSON object/],
    ['"value" not an array', '{"value":{"a":1}}', /"value" is not an array/],
    ['an element that is not an object', '{"value":[{"a":1}, 2]}', /not an object/],
    ['content after the end', '{"value":[]} {"value":[]}', /after the end/],
    ['unbalanced brackets', '{"value":[{"a":1}]]}', /unbalanced/],
    ['mismatched brackets inside a record', '{"value":[{"a":[1}]}', /unbalanced/],
    ['an error body with status 200', '{"error":{"code":"InternalServerError","message":"x"}}', /no top-level "value"/],
    ['"value": null', '{"value":null}', /no top-level "value"/],
    ['two value arrays', '{"value":[],"value":[]}', /more than one/],
    ['a string element', '{"value":["a"]}', /not an object/],
    ['a raw newline inside a string', '{"value":[{"a":"x\ny"}]}', /control character/],
  ])('refuses %s', async (_what, text, message) => {
    await expect(scan(text)).rejects.toThrow(message);
  });

  it('refuses a record larger than the limit instead of growing without bound', async () => {
    const text = `{"value":[{"big":"${'x'.repeat(300_000)}"}]}`;
    await expect(scan(text, 4096, { maxRecordBytes: 256 * 1024 })).rejects.toThrow(/larger than 262144 bytes/);
    const { transform } = await scan(text, 4096, { maxRecordBytes: 512 * 1024 });
    expect(transform.records).toBe(1);
  });
});
