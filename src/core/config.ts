import { TableClient } from '@azure/data-tables';
import { BlobServiceClient } from '@azure/storage-blob';
import { QueueServiceClient } from '@azure/storage-queue';
import { z } from 'zod';
import { EXPORT_IDS, type ExportId, isExportId, JSON_EXPORT_IDS, MAX_PAGE_SIZE } from './catalog.js';
import { redact } from './redact.js';

/**
 * Every setting the app reads, parsed once. The names are app-setting names (what you put in
 * local.settings.json, the Function App's configuration and infra/), documented in README.
 */
export class ConfigError extends Error {
  readonly problems: readonly { setting: string; problem: string }[];
  constructor(problems: { setting: string; problem: string }[]) {
    super(
      `mdvm-ingest refuses to start: invalid settings\n${problems.map((p) => `  - ${p.setting}: ${p.problem}`).join('\n')}`,
    );
    this.name = 'ConfigError';
    this.problems = problems;
  }
}

const LOOPBACK_HOSTS = new Set(['127.0.0.1', 'localhost', '[::1]', '::1']);

export function isLoopbackHost(hostname: string): boolean {
  return LOOPBACK_HOSTS.has(hostname.toLowerCase()) || /^127\.\d+\.\d+\.\d+$/.test(hostname);
}

const booleanSetting = (defaultValue: boolean) =>
  z
    .enum(['true', 'false', 'TRUE', 'FALSE', 'True', 'False', '1', '0'], {
      error: 'expected true or false',
    })
    .default(defaultValue ? 'true' : 'false')
    .transform((v) => v.toLowerCase() === 'true' || v === '1');

/** Plain decimal digits only: `0x10`, `1e4` and `0b11` are numbers to JavaScript but not what anyone meant. */
const onlyDecimal = (pattern: RegExp) => (value: unknown) =>
  typeof value === 'string' && !pattern.test(value.trim()) ? Number.NaN : value;

const intSetting = (defaultValue: number, min: number, max: number) =>
  z
    .preprocess(
      onlyDecimal(/^-?\d+$/),
      z.coerce
        .number({ error: 'expected a whole number' })
        .int({ error: 'expected a whole number' })
        .min(min, { error: `must be at least ${min}` })
        .max(max, { error: `must be at most ${max}` }),
    )
    .default(defaultValue);

const numberSetting = (defaultValue: number, min: number, max: number) =>
  z
    .preprocess(
      onlyDecimal(/^-?\d+(\.\d+)?$/),
      z.coerce
        .number({ error: 'expected a number' })
        .min(min, { error: `must be at least ${min}` })
        .max(max, { error: `must be at most ${max}` }),
    )
    .default(defaultValue);

const urlSetting = z.url({ error: 'expected an absolute URL' });

// Azure queue names: 3-63 lower-case letters, digits and single hyphens.
const queueName = z
  .string()
  .regex(/^(?=.{3,63}$)[a-z0-9]+(-[a-z0-9]+)*$/, { error: 'expected 3-63 lower-case letters, digits or hyphens' })
  // The host parks failed messages on `<name>-poison`, which must be a valid queue name too.
  .refine((name) => name.length <= 63 - '-poison'.length, {
    error: 'at most 56 characters: the poison queue <name>-poison must fit in 63',
  });
const tableName = z
  .string()
  .regex(/^[A-Za-z][A-Za-z0-9]{2,62}$/, { error: 'expected 3-63 letters or digits, starting with a letter' })
  .refine((name) => name.toLowerCase() !== 'tables', { error: '"tables" is reserved by Table Storage' });
const containerName = z
  .string()
  .regex(/^(?=.{3,63}$)[a-z0-9]+(-[a-z0-9]+)*$/, { error: 'expected 3-63 lower-case letters, digits or hyphens' });

// NCRONTAB with seconds, as the Functions timer trigger expects (6 fields).
const schedule = z
  .string()
  .trim()
  .refine((s) => s.split(/\s+/).length === 6, {
    error: 'expected a six-field NCRONTAB expression, e.g. "0 17 * * * *" (hourly at :17)',
  })
  .superRefine((s, ctx) => {
    const problem = ncrontabProblem(s);
    if (problem) ctx.addIssue({ code: 'custom', message: problem });
  });

/** Seconds, minutes, hours, day of month, month, day of week: the ranges each NCRONTAB field accepts. */
const NCRONTAB_FIELDS = [
  { name: 'second', min: 0, max: 59 },
  { name: 'minute', min: 0, max: 59 },
  { name: 'hour', min: 0, max: 23 },
  { name: 'day of month', min: 1, max: 31 },
  { name: 'month', min: 1, max: 12, names: 'jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec' },
  { name: 'day of week', min: 0, max: 6, names: 'sun|mon|tue|wed|thu|fri|sat' },
] as const;

/** Why a six-field NCRONTAB expression cannot run (a field out of range or not a number), if it cannot. */
function ncrontabProblem(expression: string): string | undefined {
  const fields = expression.split(/\s+/);
  if (fields.length !== 6) return undefined;
  for (const [i, field] of fields.entries()) {
    const spec = NCRONTAB_FIELDS[i];
    if (!spec) continue;
    for (const item of field.split(',')) {
      const [range = '', step] = item.split('/');
      if (step !== undefined && !/^[1-9]\d*$/.test(step))
        return `${spec.name} field '${field}': step '${step}' is not a number`;
      if (range === '*') continue;
      for (const bound of range.split('-')) {
        const named = 'names' in spec && new RegExp(`^(${spec.names})$`, 'i').test(bound);
        const n = /^\d+$/.test(bound) ? Number(bound) : Number.NaN;
        if (!named && (Number.isNaN(n) || n < spec.min || n > spec.max)) {
          return `${spec.name} field '${field}' is outside ${spec.min}-${spec.max}`;
        }
      }
    }
  }
  return undefined;
}

const hostPatterns = z
  .string()
  .transform((s) =>
    s
      .split(',')
      .map((p) => p.trim().toLowerCase())
      .filter((p) => p.length > 0),
  )
  .refine((list) => list.length > 0, { error: 'expected at least one host pattern' })
  .refine((list) => list.every((p) => /^(\*\.)?[a-z0-9.-]+$/.test(p)), {
    error: 'each entry must be a host name, optionally starting with "*." (e.g. *.blob.core.windows.net)',
  })
  // A wildcard over a wider domain (*.net, *.core.windows.net) would admit any host under it: a source is a storage
  // account under a blob service domain.
  .refine((list) => list.every((p) => !p.startsWith('*.') || p.split('.').length >= 5), {
    error: 'a wildcard entry must name a storage service domain (e.g. *.blob.core.windows.net), not a wider one',
  });

/**
 * `all` or a comma-separated list of export ids, as MDVM_EXPORTS and the CLI's `--exports` take it: the export
 * ids, each once, or the reason the list is refused.
 */
export function parseExportList(text: string): { exports: ExportId[] } | { problem: string } {
  const items = text
    .split(',')
    .map((x) => x.trim())
    .filter((x) => x.length > 0);
  if (items.length === 1 && items[0] === 'all') return { exports: [...EXPORT_IDS] };
  const unknown = items.filter((x) => !isExportId(x));
  if (unknown.length > 0 || items.length === 0) {
    return {
      problem: `unknown export type ${unknown.map(shownValue).join(', ') || '(empty)'}; expected "all" or a comma-separated list of: ${EXPORT_IDS.join(', ')}`,
    };
  }
  return { exports: [...new Set(items)] as ExportId[] };
}

const exportsList = z
  .string()
  .default('all')
  .transform((s, ctx): ExportId[] => {
    const parsed = parseExportList(s);
    if ('exports' in parsed) return parsed.exports;
    ctx.addIssue({ code: 'custom', message: parsed.problem });
    return z.NEVER;
  });

const jsonExportsList = z
  .string()
  .default('')
  .transform((s, ctx): ExportId[] => {
    if (s.trim() === '') return [];
    const parsed = parseExportList(s);
    if (!('exports' in parsed)) {
      ctx.addIssue({ code: 'custom', message: parsed.problem });
      return z.NEVER;
    }
    const noJson = parsed.exports.filter((id) => !JSON_EXPORT_IDS.includes(id));
    if (noJson.length > 0) {
      ctx.addIssue({
        code: 'custom',
        message: `${noJson.join(', ')} has no paged JSON endpoint; JSON mode is for: ${JSON_EXPORT_IDS.join(', ')}`,
      });
      return z.NEVER;
    }
    return parsed.exports;
  });

/** Derived data is opt-in per export type: '' (off, the default), `all`, or a list of export ids. */
const optionalExportsList = z
  .string()
  .default('')
  .transform((s, ctx): ExportId[] => {
    if (s.trim() === '') return [];
    const parsed = parseExportList(s);
    if ('exports' in parsed) return parsed.exports;
    ctx.addIssue({ code: 'custom', message: parsed.problem });
    return z.NEVER;
  });

export const settingsSchema = z
  .object({
    // Runtime storage (queue + manifest tables): a connection string, or identity-based service URIs.
    AzureWebJobsStorage: z.string().min(1).optional(),
    AzureWebJobsStorage__queueServiceUri: urlSetting.optional(),
    AzureWebJobsStorage__tableServiceUri: urlSetting.optional(),
    // Landing storage: a connection string (local only), or the blob endpoint (identity-based).
    MDVM_LANDING_CONNECTION_STRING: z.string().min(1).optional(),
    MDVM_LANDING_BLOB_ENDPOINT: urlSetting.optional(),
    MDVM_LANDING_CONTAINER: containerName.default('mdvm-landing'),
    // Defender API
    MDVM_DEFENDER_API_BASE_URL: urlSetting.default('https://api.security.microsoft.com'),
    MDVM_DEFENDER_TOKEN_SCOPE: z
      .string()
      .regex(/^https:\/\/\S+\/\.default$/, { error: 'expected https://<resource>/.default' })
      .default('https://api.securitycenter.microsoft.com/.default'),
    MDVM_DEFENDER_TIMEOUT_MS: intSetting(60_000, 1_000, 600_000),
    MDVM_DEFENDER_MAX_RETRIES: intSetting(4, 0, 10),
    MDVM_DEFENDER_MAX_RETRY_WAIT_SECONDS: intSetting(90, 1, 600),
    // What runs and when
    MDVM_EXPORTS: exportsList,
    MDVM_SCHEDULE: schedule.default('0 17 * * * *'),
    MDVM_SAS_VALID_HOURS: intSetting(6, 1, 24),
    MDVM_SAS_SAFETY_MARGIN_SECONDS: intSetting(60, 0, 3_600),
    // Queue and tables
    MDVM_PARTS_QUEUE: queueName.default('mdvm-parts'),
    MDVM_SNAPSHOTS_TABLE: tableName.default('snapshots'),
    MDVM_PARTS_TABLE: tableName.default('parts'),
    MDVM_ENQUEUE_CONCURRENCY: intSetting(16, 1, 64),
    MDVM_MAX_PARTS_PER_SNAPSHOT: intSetting(20_000, 1, 100_000),
    // The other two ways Defender serves the data
    MDVM_JSON_EXPORTS: jsonExportsList,
    MDVM_JSON_PAGE_SIZE: intSetting(MAX_PAGE_SIZE, 1, MAX_PAGE_SIZE),
    MDVM_DELTA_SCHEDULE: schedule.optional(),
    // Derived data (docs/downstream): curated Parquet and change sets, built after a snapshot completes
    MDVM_CURATED_EXPORTS: optionalExportsList,
    MDVM_CHANGE_SET_EXPORTS: optionalExportsList,
    MDVM_DERIVE_QUEUE: queueName.default('mdvm-derive'),
    MDVM_DERIVE_CONCURRENCY: intSetting(2, 1, 16),
    // Security
    MDVM_SOURCE_HOST_ALLOWLIST: hostPatterns.default(['*.blob.core.windows.net']),
    MDVM_ALLOW_LOOPBACK: booleanSetting(false),
    // Copy tuning
    MDVM_COPY_MODE: z.enum(['server', 'stream'], { error: 'expected "server" or "stream"' }).default('server'),
    MDVM_COPY_SINGLE_SHOT_MAX_MIB: numberSetting(256, 0.0625, 256),
    MDVM_COPY_BLOCK_SIZE_MIB: numberSetting(8, 0.0625, 4_000),
    MDVM_COPY_BLOCK_CONCURRENCY: intSetting(8, 1, 64),
    MDVM_STREAM_BUFFER_MIB: intSetting(4, 1, 100),
    MDVM_STREAM_BUFFERS: intSetting(4, 1, 32),
    MDVM_COUNT_RECORDS: booleanSetting(false),
    // Identity
    AZURE_CLIENT_ID: z
      .string()
      .regex(/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i, {
        error: "expected the managed identity's client id, a GUID",
      })
      .optional(),
  })
  .superRefine((s, ctx) => {
    for (const setting of ['MDVM_CURATED_EXPORTS', 'MDVM_CHANGE_SET_EXPORTS'] as const) {
      const notLanded = s[setting].filter((id) => !s.MDVM_EXPORTS.includes(id));
      if (notLanded.length > 0) {
        ctx.addIssue({
          code: 'custom',
          path: [setting],
          message: `${notLanded.join(', ')} is not in MDVM_EXPORTS, so no snapshot of it would complete`,
        });
      }
    }
    if (s.MDVM_DERIVE_QUEUE === s.MDVM_PARTS_QUEUE) {
      ctx.addIssue({ code: 'custom', path: ['MDVM_DERIVE_QUEUE'], message: 'must differ from MDVM_PARTS_QUEUE' });
    }
    // Each queue's dead letters go to <name>-poison: one function must never consume the other's dead letters.
    for (const [setting, other] of [
      ['MDVM_DERIVE_QUEUE', 'MDVM_PARTS_QUEUE'],
      ['MDVM_PARTS_QUEUE', 'MDVM_DERIVE_QUEUE'],
    ] as const) {
      if (s[setting] === `${s[other]}-poison`) {
        ctx.addIssue({ code: 'custom', path: [setting], message: `must not be ${other}'s poison queue` });
      }
    }
    if (s.MDVM_DELTA_SCHEDULE !== undefined && !s.MDVM_EXPORTS.includes('software-vulnerabilities')) {
      ctx.addIssue({
        code: 'custom',
        path: ['MDVM_DELTA_SCHEDULE'],
        message:
          'the delta starts from a complete software-vulnerabilities snapshot: add software-vulnerabilities to MDVM_EXPORTS',
      });
    }
    const notRun = s.MDVM_JSON_EXPORTS.filter((id) => !s.MDVM_EXPORTS.includes(id));
    if (notRun.length > 0) {
      ctx.addIssue({
        code: 'custom',
        path: ['MDVM_JSON_EXPORTS'],
        message: `${notRun.join(', ')} is not in MDVM_EXPORTS, so nothing would read it`,
      });
    }
    const hasConn = s.AzureWebJobsStorage !== undefined;
    const hasUris =
      s.AzureWebJobsStorage__queueServiceUri !== undefined || s.AzureWebJobsStorage__tableServiceUri !== undefined;
    if (!hasConn && !hasUris) {
      ctx.addIssue({
        code: 'custom',
        path: ['AzureWebJobsStorage'],
        message:
          'missing: set AzureWebJobsStorage__queueServiceUri and AzureWebJobsStorage__tableServiceUri (managed identity), or AzureWebJobsStorage (connection string, local only)',
      });
    }
    if (!hasConn && hasUris) {
      for (const key of ['AzureWebJobsStorage__queueServiceUri', 'AzureWebJobsStorage__tableServiceUri'] as const) {
        if (s[key] === undefined) {
          ctx.addIssue({ code: 'custom', path: [key], message: 'missing (both service URIs are needed)' });
        }
      }
    }
    const landing = [s.MDVM_LANDING_CONNECTION_STRING, s.MDVM_LANDING_BLOB_ENDPOINT].filter((x) => x !== undefined);
    if (landing.length !== 1) {
      ctx.addIssue({
        code: 'custom',
        path: ['MDVM_LANDING_BLOB_ENDPOINT'],
        message:
          landing.length === 0
            ? 'missing: set MDVM_LANDING_BLOB_ENDPOINT (managed identity) or MDVM_LANDING_CONNECTION_STRING (local only)'
            : 'set only one of MDVM_LANDING_BLOB_ENDPOINT and MDVM_LANDING_CONNECTION_STRING',
      });
    }
    for (const key of [
      'MDVM_LANDING_BLOB_ENDPOINT',
      'AzureWebJobsStorage__queueServiceUri',
      'AzureWebJobsStorage__tableServiceUri',
    ] as const) {
      const endpoint = s[key] === undefined ? undefined : safeUrl(s[key]);
      if (endpoint && endpoint.protocol !== 'https:' && !(s.MDVM_ALLOW_LOOPBACK && isLoopbackHost(endpoint.hostname))) {
        ctx.addIssue({
          code: 'custom',
          path: [key],
          message: `must be https (got ${endpoint.protocol.replace(':', '')}; http only for a loopback host with MDVM_ALLOW_LOOPBACK=true)`,
        });
      }
      if (endpoint && (endpoint.search || endpoint.hash || endpoint.username || endpoint.password)) {
        ctx.addIssue({ code: 'custom', path: [key], message: 'must carry no query string, fragment or credentials' });
      }
      // The service URL, not a container's: a path would put every blob under an extra prefix, off the documented
      // layout. Only the emulator (a loopback host) puts the account name in the path.
      const segments = endpoint?.pathname.split('/').filter(Boolean) ?? [];
      const emulator = s.MDVM_ALLOW_LOOPBACK && endpoint !== undefined && isLoopbackHost(endpoint.hostname);
      if (endpoint && segments.length > (emulator ? 1 : 0)) {
        ctx.addIssue({
          code: 'custom',
          path: [key],
          message: `must be the account's service URL with no path (got path '${endpoint.pathname.slice(0, 60)}'${
            key === 'MDVM_LANDING_BLOB_ENDPOINT' ? '; the container is MDVM_LANDING_CONTAINER' : ''
          })`,
        });
      }
    }
    for (const key of ['AzureWebJobsStorage', 'MDVM_LANDING_CONNECTION_STRING'] as const) {
      const value = s[key];
      const problem =
        value === undefined
          ? undefined
          : (connectionStringProblem(value) ??
            sdkConnectionStringProblem(value, key === 'AzureWebJobsStorage' ? 'queue-and-table' : 'blob'));
      if (problem) ctx.addIssue({ code: 'custom', path: [key], message: problem });
    }
    const base = safeUrl(s.MDVM_DEFENDER_API_BASE_URL);
    if (base && (base.search || base.hash || base.username || base.password)) {
      ctx.addIssue({
        code: 'custom',
        path: ['MDVM_DEFENDER_API_BASE_URL'],
        message: 'must be a plain base URL, with no query string, fragment or credentials',
      });
    }
    if (base && !(base.protocol === 'https:' || (s.MDVM_ALLOW_LOOPBACK && isLoopbackHost(base.hostname)))) {
      ctx.addIssue({
        code: 'custom',
        path: ['MDVM_DEFENDER_API_BASE_URL'],
        message: 'must be https (http is accepted only for a loopback host with MDVM_ALLOW_LOOPBACK=true)',
      });
    }
    if (s.MDVM_COUNT_RECORDS && s.MDVM_COPY_MODE !== 'stream') {
      ctx.addIssue({
        code: 'custom',
        path: ['MDVM_COUNT_RECORDS'],
        message: 'counting records reads the bytes: it needs MDVM_COPY_MODE=stream',
      });
    }
    if (s.MDVM_COPY_BLOCK_SIZE_MIB > 4_000) {
      ctx.addIssue({ code: 'custom', path: ['MDVM_COPY_BLOCK_SIZE_MIB'], message: 'must be at most 4000' });
    }
  });

/**
 * Settings the Functions host reads (not this code): identity-based AzureWebJobsStorage for the host's own
 * blob use and the queue trigger, Application Insights with Entra authentication, and the Node.js arguments it
 * starts the worker with (src/deploy/nodeArguments.ts). Infra sets them; the infra checks allow exactly these
 * beside SETTING_NAMES.
 */
export const HOST_SETTING_NAMES = [
  'AzureWebJobsStorage__blobServiceUri',
  'AzureWebJobsStorage__credential',
  'AzureWebJobsStorage__clientId',
  'APPLICATIONINSIGHTS_CONNECTION_STRING',
  'APPLICATIONINSIGHTS_AUTHENTICATION_STRING',
  'languageWorkers__node__arguments',
] as const;

/** What a deployment in Azure must set: identity-based storage, no keys. */
export const AZURE_REQUIRED_SETTINGS = [
  'AzureWebJobsStorage__queueServiceUri',
  'AzureWebJobsStorage__tableServiceUri',
  'MDVM_LANDING_BLOB_ENDPOINT',
  'AZURE_CLIENT_ID',
] as const;

/** Key- or connection-string-based settings that must never appear in a deployment. */
export const LOCAL_ONLY_SETTINGS = ['AzureWebJobsStorage', 'MDVM_LANDING_CONNECTION_STRING'] as const;

export type Settings = z.output<typeof settingsSchema>;
export type SettingName = keyof z.input<typeof settingsSchema>;
export const SETTING_NAMES = Object.keys(settingsSchema.shape) as SettingName[];

export type StorageEndpoint =
  | { kind: 'connection-string'; connectionString: string }
  | { kind: 'identity'; url: string };

export interface AppConfig {
  readonly exports: readonly ExportId[];
  readonly schedule: string;
  /** Exports read through their paged JSON endpoint instead of via files (a subset of `exports`). */
  readonly jsonExports: readonly ExportId[];
  /** `pageSize` asked of the JSON and delta endpoints. */
  readonly pageSize: number;
  /** The software-vulnerability delta, when MDVM_DELTA_SCHEDULE turns it on. */
  readonly delta: { readonly schedule: string } | undefined;
  readonly defender: {
    readonly baseUrl: string;
    readonly scope: string;
    readonly timeoutInMs: number;
    readonly maxRetries: number;
    readonly maxRetryWaitInMs: number;
    readonly sasValidHours: number;
  };
  readonly runtimeStorage: { readonly queue: StorageEndpoint; readonly table: StorageEndpoint };
  readonly landing: { readonly blob: StorageEndpoint; readonly container: string };
  readonly queueName: string;
  readonly poisonQueueName: string;
  readonly snapshotsTable: string;
  readonly partsTable: string;
  readonly enqueueConcurrency: number;
  /** A snapshot offering more files than this is refused whole (a runaway list, not an export). */
  readonly maxPartsPerSnapshot: number;
  readonly sourceHostAllowlist: readonly string[];
  readonly allowLoopback: boolean;
  readonly sasSafetyMarginInMs: number;
  readonly copy: {
    readonly mode: 'server' | 'stream';
    readonly singleShotMaxBytes: number;
    readonly blockSizeBytes: number;
    readonly blockConcurrency: number;
    readonly streamBufferBytes: number;
    readonly streamBuffers: number;
    readonly countRecords: boolean;
  };
  readonly managedIdentityClientId: string | undefined;
  /** Derived data built after a snapshot completes, through the derive queue. */
  readonly derive: {
    readonly curatedExports: readonly ExportId[];
    readonly changeSetExports: readonly ExportId[];
    readonly queueName: string;
    readonly poisonQueueName: string;
    /** Conversions and change sets running at once in one process, whatever the host hands it. */
    readonly concurrency: number;
  };
}

const MIB = 1024 * 1024;

/** Parse the environment once. Throws ConfigError naming every bad setting. */
export function loadConfig(env: Record<string, string | undefined> = process.env): AppConfig {
  const input: Record<string, string> = {};
  for (const name of SETTING_NAMES) {
    const value = env[name];
    if (value !== undefined && value.trim() !== '') input[name] = value.trim();
  }
  const parsed = settingsSchema.safeParse(input);
  if (!parsed.success) {
    throw new ConfigError(
      parsed.error.issues.map((issue) => ({
        setting: String(issue.path[0] ?? '(settings)'),
        problem: describeIssue(issue, input[String(issue.path[0])]),
      })),
    );
  }
  const s = parsed.data;
  const runtime = (uri: string | undefined): StorageEndpoint =>
    s.AzureWebJobsStorage !== undefined
      ? { kind: 'connection-string', connectionString: s.AzureWebJobsStorage }
      : { kind: 'identity', url: uri ?? '' };
  return {
    exports: s.MDVM_EXPORTS,
    schedule: s.MDVM_SCHEDULE,
    jsonExports: s.MDVM_JSON_EXPORTS,
    pageSize: s.MDVM_JSON_PAGE_SIZE,
    delta: s.MDVM_DELTA_SCHEDULE === undefined ? undefined : { schedule: s.MDVM_DELTA_SCHEDULE },
    defender: {
      baseUrl: s.MDVM_DEFENDER_API_BASE_URL.replace(/\/+$/, ''),
      scope: s.MDVM_DEFENDER_TOKEN_SCOPE,
      timeoutInMs: s.MDVM_DEFENDER_TIMEOUT_MS,
      maxRetries: s.MDVM_DEFENDER_MAX_RETRIES,
      maxRetryWaitInMs: s.MDVM_DEFENDER_MAX_RETRY_WAIT_SECONDS * 1000,
      sasValidHours: s.MDVM_SAS_VALID_HOURS,
    },
    runtimeStorage: {
      queue: runtime(s.AzureWebJobsStorage__queueServiceUri),
      table: runtime(s.AzureWebJobsStorage__tableServiceUri),
    },
    landing: {
      blob:
        s.MDVM_LANDING_CONNECTION_STRING !== undefined
          ? { kind: 'connection-string', connectionString: s.MDVM_LANDING_CONNECTION_STRING }
          : { kind: 'identity', url: s.MDVM_LANDING_BLOB_ENDPOINT ?? '' },
      container: s.MDVM_LANDING_CONTAINER,
    },
    queueName: s.MDVM_PARTS_QUEUE,
    poisonQueueName: `${s.MDVM_PARTS_QUEUE}-poison`,
    snapshotsTable: s.MDVM_SNAPSHOTS_TABLE,
    partsTable: s.MDVM_PARTS_TABLE,
    enqueueConcurrency: s.MDVM_ENQUEUE_CONCURRENCY,
    maxPartsPerSnapshot: s.MDVM_MAX_PARTS_PER_SNAPSHOT,
    sourceHostAllowlist: s.MDVM_SOURCE_HOST_ALLOWLIST,
    allowLoopback: s.MDVM_ALLOW_LOOPBACK,
    sasSafetyMarginInMs: s.MDVM_SAS_SAFETY_MARGIN_SECONDS * 1000,
    copy: {
      mode: s.MDVM_COPY_MODE,
      singleShotMaxBytes: Math.floor(s.MDVM_COPY_SINGLE_SHOT_MAX_MIB * MIB),
      blockSizeBytes: Math.floor(s.MDVM_COPY_BLOCK_SIZE_MIB * MIB),
      blockConcurrency: s.MDVM_COPY_BLOCK_CONCURRENCY,
      streamBufferBytes: s.MDVM_STREAM_BUFFER_MIB * MIB,
      streamBuffers: s.MDVM_STREAM_BUFFERS,
      countRecords: s.MDVM_COUNT_RECORDS,
    },
    managedIdentityClientId: s.AZURE_CLIENT_ID,
    derive: {
      curatedExports: s.MDVM_CURATED_EXPORTS,
      changeSetExports: s.MDVM_CHANGE_SET_EXPORTS,
      queueName: s.MDVM_DERIVE_QUEUE,
      poisonQueueName: `${s.MDVM_DERIVE_QUEUE}-poison`,
      concurrency: s.MDVM_DERIVE_CONCURRENCY,
    },
  };
}

/**
 * Whether a value could be a credential: a connection string or SAS, a JWT, or a long run of base64 / hex (an
 * account key is 88 characters of base64). Such a value is never echoed, whichever setting it landed in.
 */
export function looksLikeSecret(value: string): boolean {
  return (
    /AccountKey=|SharedAccessSignature=|sig=|sig%3d|AccessKey|password=/i.test(value) ||
    // user:password@ in a URL
    /\/\/[^/\s@]*:[^/\s@]*@/.test(value) ||
    /eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}/.test(value) ||
    // Random key material mixes character classes; a long plain name (a 60-letter queue name) does not.
    (value.match(/[A-Za-z0-9+/_-]{32,}={0,2}/g) ?? []).some(
      (run) => /[0-9]/.test(run) && /[A-Za-z]/.test(run) && (/[A-Z]/.test(run) || /^[0-9a-f]+$/i.test(run)),
    ) ||
    /[A-Za-z0-9+/]{20,}==?$/.test(value)
  );
}

/** A value as it may appear in an error: shortened, or withheld when it could be a credential. */
export function shownValue(value: string): string {
  if (looksLikeSecret(value)) return '<withheld: it looks like a key or token>';
  return `'${value.length > 60 ? `${value.slice(0, 60)}…` : value}'`;
}

function describeIssue(issue: z.core.$ZodIssue, value: string | undefined): string {
  return value === undefined ? issue.message : `${issue.message} (got ${shownValue(value)})`;
}

/**
 * Why a storage connection string cannot work, if it cannot: `UseDevelopmentStorage=true`, or `Key=Value` pairs
 * with an account (or endpoints) the SDK can build URLs from. Never quotes the value.
 */
function connectionStringProblem(value: string): string | undefined {
  if (/^UseDevelopmentStorage=true;?$/i.test(value.trim())) return undefined;
  const pairs = value
    .split(';')
    .filter((part) => part.trim().length > 0)
    .map((part) => {
      const at = part.indexOf('=');
      return at > 0 ? [part.slice(0, at).trim().toLowerCase(), part.slice(at + 1).trim()] : undefined;
    });
  if (pairs.length === 0 || pairs.some((p) => p === undefined)) {
    return 'is not a storage connection string (expected Key=Value pairs separated by ";", or UseDevelopmentStorage=true)';
  }
  const map = new Map(pairs as [string, string][]);
  for (const key of ['blobendpoint', 'queueendpoint', 'tableendpoint']) {
    const endpoint = map.get(key);
    if (endpoint !== undefined && !safeUrl(endpoint)?.protocol.startsWith('http')) {
      return `its ${key.replace('endpoint', 'Endpoint').replace(/^./, (c) => c.toUpperCase())} is not an http(s) URL`;
    }
  }
  const hasEndpoints = ['blobendpoint', 'queueendpoint', 'tableendpoint'].some((k) => map.has(k));
  if (!map.has('accountname') && !hasEndpoints) {
    return 'names no AccountName and no endpoints (expected AccountName=…;AccountKey=… or …Endpoint=…)';
  }
  return undefined;
}

/**
 * What the storage SDK says when it cannot build a client from the string (an account key without
 * DefaultEndpointsProtocol, a SAS string without the service's endpoint), so the setting is named at startup
 * instead of failing later without a name. Builds clients only; no request is sent.
 */
function sdkConnectionStringProblem(value: string, services: 'queue-and-table' | 'blob'): string | undefined {
  try {
    if (services === 'blob') {
      BlobServiceClient.fromConnectionString(value);
    } else {
      QueueServiceClient.fromConnectionString(value);
      TableClient.fromConnectionString(value, 'probe');
    }
    return undefined;
  } catch (error) {
    const said = redact(String((error as Error)?.message ?? error).split('\n')[0] ?? '');
    const needs = services === 'blob' ? 'a blob endpoint' : 'queue and table endpoints';
    return `the storage SDK cannot use it (it needs ${needs}): ${looksLikeSecret(said) ? 'its message withheld' : said.slice(0, 200)}`;
  }
}

function safeUrl(text: string): URL | undefined {
  try {
    return new URL(text);
  } catch {
    return undefined;
  }
}
