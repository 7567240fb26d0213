import { ADDITIONAL_PROPERTIES, type Column, type RecordSchema } from './schemas.js';

/**
 * One raw record to one typed row of its export's schema: keys matched case-insensitively against every known
 * spelling, values converted to the column's type. Nothing is dropped: a field no column names, and a value that does
 * not convert (a `long` column holding "n/a"), go into AdditionalProperties under their original key, so the curated
 * row still carries everything the raw line did.
 */
export type CellValue = string | number | boolean | Date | null | unknown;
export type TypedRow = Record<string, CellValue>;

export interface RecordNormaliser {
  readonly schema: RecordSchema;
  normalise(record: Record<string, unknown>): TypedRow;
}

export function recordNormaliser(schema: RecordSchema): RecordNormaliser {
  const byKey = new Map<string, Column>();
  for (const column of schema.columns) {
    byKey.set(column.name.toLowerCase(), column);
    for (const key of column.keys) byKey.set(key.toLowerCase(), column);
  }
  // Files repeat the same few spellings on every line: each exact key is lower-cased and looked up once.
  const resolved = new Map<string, Column | null>();
  const columnOf = (key: string): Column | null => {
    let column = resolved.get(key);
    if (column === undefined) {
      column = byKey.get(key.toLowerCase()) ?? null;
      if (resolved.size < 10_000) resolved.set(key, column);
    }
    return column;
  };
  const names = schema.columns.map((c) => c.name);
  return {
    schema,
    normalise(record) {
      const row: TypedRow = {};
      for (const name of names) row[name] = null;
      let extra: Record<string, unknown> | null = null;
      for (const key in record) {
        if (!Object.hasOwn(record, key)) continue;
        const value = record[key];
        const column = columnOf(key);
        if (value === undefined) continue;
        // A second spelling of a field already filled (`keyLength` and `KeySize`) is kept too, not dropped.
        if (!column || (value !== null && row[column.name] !== null)) {
          extra ??= Object.create(null) as Record<string, unknown>;
          extra[key] = value;
          continue;
        }
        if (value === null) continue;
        const converted = convert(column, value);
        if (converted === INVALID) {
          // A prototype-less bag: a key such as `__proto__` is kept as data.
          extra ??= Object.create(null) as Record<string, unknown>;
          extra[key] = value;
        } else {
          row[column.name] = converted;
        }
      }
      row[ADDITIONAL_PROPERTIES] = extra;
      return row;
    },
  };
}

const INVALID = Symbol('invalid');

function convert(column: Column, value: unknown): CellValue | typeof INVALID {
  switch (column.type) {
    case 'string':
      if (typeof value === 'string') return value;
      if (typeof value === 'number' || typeof value === 'boolean') return String(value);
      return JSON.stringify(value);
    case 'long': {
      const n = typeof value === 'number' ? value : typeof value === 'string' ? Number(value.trim()) : Number.NaN;
      return Number.isSafeInteger(n) && !(typeof value === 'string' && value.trim() === '') ? n : INVALID;
    }
    case 'real': {
      const n = typeof value === 'number' ? value : typeof value === 'string' ? Number(value.trim()) : Number.NaN;
      return Number.isFinite(n) && !(typeof value === 'string' && value.trim() === '') ? n : INVALID;
    }
    case 'bool':
      if (typeof value === 'boolean') return value;
      if (typeof value === 'string' && /^(true|false)$/i.test(value.trim()))
        return value.trim().toLowerCase() === 'true';
      if (value === 0 || value === 1) return value === 1;
      return INVALID;
    case 'datetime': {
      if (typeof value !== 'string') return INVALID;
      const parsed = parseDefenderTime(value);
      return parsed === undefined ? INVALID : parsed;
    }
    case 'dynamic':
      if (column.jsonText && typeof value === 'string') {
        try {
          return JSON.parse(value) as unknown;
        } catch {
          return value;
        }
      }
      return value;
  }
}

const TIME = /^(\d{4})-(\d{2})-(\d{2})(?:[ T](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?)?\s*(Z|[+-]\d{2}:?\d{2})?$/i;

/**
 * Defender's timestamps come in five shapes (`2020-12-30 14:17:26`, `…:58.854`, seven fraction digits, ISO with `Z`
 * or an offset); all are UTC unless they say otherwise. `0001-01-01T00:00:00Z` is Defender's "no date": null.
 * Returns undefined for text that is not a timestamp.
 */
export function parseDefenderTime(text: string): Date | null | undefined {
  const m = TIME.exec(text.trim());
  if (!m) return undefined;
  const [, y, mo, d, h = '0', mi = '0', s = '0', fraction = '', zone] = m;
  const year = Number(y);
  if (year <= 1) return null;
  const ms = Number(fraction.padEnd(3, '0').slice(0, 3));
  // Date.UTC carries any overflow into the next field (second 99 is 1:39 later), so every field is range-checked.
  let time = Date.UTC(year, Number(mo) - 1, Number(d), Number(h), Number(mi), Number(s), ms);
  const check = new Date(time);
  if (
    check.getUTCDate() !== Number(d) ||
    check.getUTCMonth() !== Number(mo) - 1 ||
    Number(h) > 23 ||
    Number(mi) > 59 ||
    Number(s) > 59
  ) {
    return undefined;
  }
  if (zone && zone.toUpperCase() !== 'Z') {
    const sign = zone.startsWith('-') ? -1 : 1;
    const digits = zone.slice(1).replace(':', '');
    const offsetHours = Number(digits.slice(0, 2));
    const offsetMinutes = Number(digits.slice(2));
    if (offsetHours > 23 || offsetMinutes > 59) return undefined;
    time -= sign * (offsetHours * 60 + offsetMinutes) * 60_000;
  }
  return new Date(time);
}
