#!/usr/bin/env -S node --initial-old-space-size=96
/**
 * mdvm-ingest — the operator CLI. Same settings (by app-setting name), same schema, same core code as the
 * Functions app: `run` drives the registered handlers in-process, `status`/`verify`/`requeue` read and repair
 * what the app wrote, `derive` builds curated data and change sets for snapshots that already completed. Exit codes: 0 all well, 1 the command worked but found a problem, 2 bad input.
 */
// First: on an older Node the imports below fail while loading, with errors that do not say why.
import './requireNode.js';
import { Command, CommanderError, InvalidArgumentError, Option } from 'commander';
import ora from 'ora';
import { DELTA_EXPORT, type ExportId, type LandedExportId, landedExports } from '../core/catalog.js';
import { type AppConfig, ConfigError, loadConfig, parseExportList } from '../core/config.js';
import { errorMessage, isStorageCondition } from '../core/errors.js';
import { redact } from '../core/redact.js';
import { createRuntime, type Runtime } from '../core/runtime.js';
import { ensureStorage } from '../core/storage.js';
import { redactingLogger, Telemetry } from '../core/telemetry.js';
import { type BackfillProgress, backfillDerived } from '../ops/derive.js';
import { requeuePoisoned } from '../ops/requeue.js';
import { runIngestion } from '../ops/run.js';
import { exportStatus, renderStatus } from '../ops/status.js';
import { formatBytes, renderTable } from '../ops/summary.js';
import { verifyLanding } from '../ops/verify.js';
import { SettingsFileError, settingsFrom } from './settings.js';

interface GlobalOptions {
  settings?: string;
  verbose?: boolean;
}

/** Control characters (ESC sequences, carriage returns) in text from a queue or a table never reach the terminal. */
// biome-ignore lint/suspicious/noControlCharactersInRegex: control characters are what it removes
const CONTROL = /[\u0000-\u0008\u000b-\u001f\u007f-\u009f]/g;
const out = (line = '') => process.stdout.write(`${redact(line).replace(CONTROL, '?')}\n`);
const err = (line: string) => process.stderr.write(`${redact(line).replace(CONTROL, '?')}\n`);
/** One field of one output line: a forged message must not write lines of its own (a fake summary). */
// biome-ignore lint/suspicious/noControlCharactersInRegex: control characters are what it removes
const ANY_CONTROL = /[\u0000-\u001f\u007f-\u009f]/g;
const field = (text: string) => text.replace(ANY_CONTROL, '?').slice(0, 300);

/** The same parser as MDVM_EXPORTS, which also takes the delta's id. */
function exportList(value: string): LandedExportId[] {
  const items = value.split(',').map((x) => x.trim());
  const delta = items.includes(DELTA_EXPORT.id);
  const rest = items.filter((x) => x !== DELTA_EXPORT.id);
  if (delta && rest.every((x) => x === '')) return [DELTA_EXPORT.id];
  const parsed = parseExportList(rest.join(','));
  if ('problem' in parsed) throw new InvalidArgumentError(`${parsed.problem}, or ${DELTA_EXPORT.id}`);
  return [...parsed.exports, ...(delta ? [DELTA_EXPORT.id] : [])];
}

function exportId(value: string): LandedExportId {
  const list = exportList(value);
  if (list.length !== 1 || value.trim().toLowerCase() === 'all') {
    throw new InvalidArgumentError(`one export id (got ${list.length}: ${list.join(', ')})`);
  }
  return list[0] as LandedExportId;
}

/** Node's timers hold at most 2^31-1 ms; a longer wait would fire at once. */
const MAX_SECONDS = Math.floor((2 ** 31 - 1) / 1000);

function positiveInt(name: string, max = MAX_SECONDS) {
  return (value: string): number => {
    const n = /^\d+$/.test(value.trim()) ? Number(value) : Number.NaN;
    if (!Number.isInteger(n) || n < 1 || n > max) {
      throw new InvalidArgumentError(`${name} must be a whole number from 1 to ${max}`);
    }
    return n;
  };
}

/** The settings the command runs with, to name the resource a 404 is about. */
let openedConfig: AppConfig | undefined;

function openRuntime(global: GlobalOptions): Runtime {
  const env = settingsFrom(global.settings);
  // Credentials (managed identity endpoint, tenant, client id) are read from the process environment.
  // As in settingsFrom, an empty variable is no value: the file's one is used (AZURE_TENANT_ID= must not hide it).
  for (const [key, value] of Object.entries(env))
    if ((process.env[key] ?? '').trim() === '' && value !== undefined) process.env[key] = value;
  openedConfig = loadConfig(env);
  return createRuntime(openedConfig);
}

/**
 * A container, table or queue the settings name is not there (deleted, or the settings point at another account):
 * say which and by which setting, instead of the service's raw 404 body.
 */
function missingResource(error: unknown, config: AppConfig | undefined): string | undefined {
  const e = (error ?? {}) as { statusCode?: number; code?: string; cause?: unknown; name?: string };
  const inner = (e.cause ?? {}) as { statusCode?: number; code?: string; name?: string };
  const code = e.code ?? inner.code ?? '';
  const known = ['ContainerNotFound', 'TableNotFound', 'QueueNotFound'].includes(code);
  // A 404 of the storage SDK with no code at all (Azurite answers a missing queue so); never Defender's 404, never a
  // blob or message that is gone.
  const storage404 = [e, inner].some((x) => x.name === 'RestError' && x.statusCode === 404) && code === '';
  if (!config || !(known || storage404)) return undefined;
  const container = `the landing container '${config.landing.container}' (MDVM_LANDING_CONTAINER)`;
  const tables = `the tables '${config.snapshotsTable}' (MDVM_SNAPSHOTS_TABLE) and '${config.partsTable}' (MDVM_PARTS_TABLE)`;
  const queues = `the queues '${config.queueName}' (MDVM_PARTS_QUEUE), '${config.derive.queueName}' (MDVM_DERIVE_QUEUE) and their -poison queues`;
  const what =
    code === 'ContainerNotFound'
      ? `${container} does not exist`
      : code === 'TableNotFound'
        ? `${tables} do not exist`
        : code === 'QueueNotFound'
          ? `${queues} do not exist`
          : `a resource the settings name does not exist (${container}; ${tables}; ${queues})`;
  return `${what}: check the settings and the account, or create it (azd provision creates them in Azure; \`mdvm-ingest run\` creates them against Azurite)`;
}

async function createMissing(runtime: Runtime): Promise<void> {
  // Infra creates these in Azure; against Azurite (or a fresh account) create them. A 403 means the identity
  // may use but not create them, which is fine.
  await ensureStorage(runtime.storage).catch((error: unknown) => {
    if (!isStorageCondition(error, 'forbidden')) throw error;
  });
}

async function runCommand(
  global: GlobalOptions,
  options: { exports?: LandedExportId[]; workers: number; timeoutS: number },
) {
  const runtime = openRuntime(global);
  const exports = options.exports ?? landedExports(runtime.config);
  await createMissing(runtime);
  const controller = new AbortController();
  let interrupts = 0;
  // SIGTERM (a service manager, a container stop, `kill`) stops as cleanly as Ctrl-C instead of killing copies.
  const onSigint = (signal: NodeJS.Signals) => {
    interrupts++;
    if (interrupts > 1) process.exit(signal === 'SIGTERM' ? 143 : 130);
    err('interrupted: letting copies in flight finish (Ctrl-C again to quit now); the next run resumes');
    controller.abort();
  };
  process.on('SIGINT', onSigint);
  process.on('SIGTERM', onSigint);
  const tty = process.stdout.isTTY === true;
  const spinner = tty ? ora({ text: 'asking the Defender API…', stream: process.stdout }).start() : undefined;
  let parts = 0;
  let bytes = 0;
  let lastPlain = 0;
  const progress = () => {
    const text = `copying: ${parts} parts, ${formatBytes(bytes)} landed`;
    if (spinner) spinner.text = text;
    else if (Date.now() - lastPlain > 5_000) {
      lastPlain = Date.now();
      out(text);
    }
  };
  try {
    const report = await runIngestion(runtime, {
      exports,
      workers: options.workers,
      timeoutInMs: options.timeoutS * 1000,
      abortSignal: controller.signal,
      onEvent: (event) => {
        if (event.event === 'part' && event.outcome === 'landed') {
          parts++;
          bytes += event.bytes ?? 0;
          progress();
        }
      },
      onLog: (level, line) => {
        if (global.verbose && level !== 'information') err(line);
      },
    });
    spinner?.stop();
    out(`${report.partsCopied} parts, ${formatBytes(report.bytesCopied)} copied in ${report.seconds.toFixed(1)} s`);
    out(renderTable(report.rows, report.throughput, new Map(report.rows.map((r) => [r.exportId, r.note]))));
    if (report.interrupted) out('interrupted: nothing is half-written; run again to resume');
    if (report.timedOut) {
      const stopped = report.unfinished
        ? `: ${report.unfinished} copies still running were stopped, their parts unfinished`
        : '';
      out(`stopped after --timeout-s ${options.timeoutS}${stopped}; run again to resume`);
    }
    return report.ok ? 0 : 1;
  } finally {
    spinner?.stop();
    process.off('SIGINT', onSigint);
    process.off('SIGTERM', onSigint);
  }
}

/** Derived data exists for the via-files types only (the delta is a change list already). */
function viaFilesList(value: string): ExportId[] {
  const parsed = parseExportList(value);
  if ('problem' in parsed) throw new InvalidArgumentError(parsed.problem);
  return parsed.exports;
}

async function deriveCommand(
  global: GlobalOptions,
  options: { exports?: ExportId[]; only?: 'curated' | 'changes'; since?: string; workers: number; json?: boolean },
): Promise<number> {
  // Date.parse reads '1' as the year 2001: only a date (and optional time) in ISO form is taken.
  if (
    options.since !== undefined &&
    // A time needs its zone: without one Date.parse reads local time, while a date alone is read as UTC.
    (!/^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2}))?$/.test(options.since) ||
      Number.isNaN(Date.parse(options.since)) ||
      // Date.parse rolls 2026-02-30 over to March: the day must survive the round trip.
      new Date(`${options.since.slice(0, 10)}T00:00:00Z`).toISOString().slice(0, 10) !== options.since.slice(0, 10))
  ) {
    err(
      `mdvm-ingest: --since '${options.since}' is not an ISO time (e.g. 2026-11-01 or 2026-11-01T00:00:00Z; a time needs its zone)`,
    );
    return 2;
  }
  const runtime = openRuntime(global);
  const curatedExports = options.only === 'changes' ? [] : (options.exports ?? runtime.config.derive.curatedExports);
  const changeSetExports =
    options.only === 'curated' ? [] : (options.exports ?? runtime.config.derive.changeSetExports);
  if (curatedExports.length === 0 && changeSetExports.length === 0) {
    err(
      'mdvm-ingest: nothing to build: pass --exports, or set MDVM_CURATED_EXPORTS / MDVM_CHANGE_SET_EXPORTS (README "Derived data")',
    );
    return 2;
  }
  const controller = new AbortController();
  let interrupts = 0;
  const onSigint = (signal: NodeJS.Signals) => {
    interrupts++;
    if (interrupts > 1) process.exit(signal === 'SIGTERM' ? 143 : 130);
    err('interrupted: finishing the parts in flight (again to quit now); run again to resume (what exists is skipped)');
    controller.abort();
  };
  process.on('SIGINT', onSigint);
  process.on('SIGTERM', onSigint);
  const tty = process.stdout.isTTY === true && !options.json;
  const spinner = tty ? ora({ text: 'listing complete snapshots…', stream: process.stdout }).start() : undefined;
  let lastPlain = 0;
  const line = (p: BackfillProgress) =>
    `derive: ${p.snapshots} snapshots; curated parts ${p.curatedParts.built + p.curatedParts.existing + p.curatedParts.failed}/${p.curatedParts.total} (${p.curatedParts.rows.toLocaleString('en-US')} rows); change sets ${p.changeSets.built + p.changeSets.existing + p.changeSets.failed}/${p.changeSets.total}`;
  const telemetry = new Telemetry(
    redactingLogger((level, text) => {
      if (global.verbose && level !== 'info') err(text);
    }),
  );
  try {
    const report = await backfillDerived(runtime, telemetry, {
      curatedExports,
      changeSetExports,
      ...(options.since ? { since: options.since } : {}),
      workers: options.workers,
      abortSignal: controller.signal,
      onProgress: (p) => {
        if (spinner) spinner.text = line(p);
        else if (!options.json && Date.now() - lastPlain > 5_000) {
          lastPlain = Date.now();
          out(line(p));
        }
      },
    });
    spinner?.stop();
    if (options.json) out(JSON.stringify({ v: 1, ...report }, null, 2));
    else {
      out(line(report));
      out(
        `built ${report.curatedParts.built} curated parts and ${report.changeSets.built} change sets; ${report.curatedParts.existing + report.changeSets.existing} already there; ${report.failures.length} failed; ${report.seconds.toFixed(1)} s`,
      );
      for (const f of report.failures) out(`failed  ${f.export} ${f.snapshot} ${f.what}: ${oneLine(f.reason)}`);
      if (report.interrupted) out('interrupted: run again to resume');
    }
    return report.failures.length > 0 || report.interrupted ? 1 : 0;
  } finally {
    spinner?.stop();
    process.off('SIGINT', onSigint);
    process.off('SIGTERM', onSigint);
  }
}

async function main(argv: string[]): Promise<number> {
  const program = new Command()
    .name('mdvm-ingest')
    .description('Land Defender Vulnerability Management export snapshots and check what landed.')
    .option('--settings <file>', 'read app settings from a local.settings.json or .env file (the environment wins)')
    .option('--verbose', 'print handler warnings and full stack traces')
    .showHelpAfterError('(add --help for usage)')
    .exitOverride()
    .configureOutput({ writeErr: (s) => process.stderr.write(s) });
  let code = 0;
  const global = () => program.opts<GlobalOptions>();

  program
    .command('run')
    .description('one-shot ingestion: request the chosen exports and copy every part until complete')
    .addOption(
      new Option('--exports <list>', 'comma-separated export ids (default: MDVM_EXPORTS)').argParser(exportList),
    )
    .addOption(new Option('--workers <n>', 'in-process queue workers').argParser(positiveInt('--workers')).default(8))
    .addOption(
      new Option('--timeout-s <seconds>', 'give up after this long').argParser(positiveInt('--timeout-s')).default(600),
    )
    .action(async (options: { exports?: LandedExportId[]; workers: number; timeoutS: number }) => {
      code = await runCommand(global(), options);
    });

  program
    .command('status')
    .description('newest snapshot of every export type: parts, bytes, status, age, last failure')
    .option('--json', 'print the documented JSON shape')
    .action(async (options: { json?: boolean }) => {
      const runtime = openRuntime(global());
      const report = await exportStatus(runtime, landedExports(runtime.config));
      out(options.json ? JSON.stringify(report, null, 2) : renderStatus(report));
      code = report.exports.every((e) => e.status === 'complete') ? 0 : 1;
    });

  program
    .command('verify')
    .description('compare the landing container with the tables and every _manifest.json')
    .addOption(new Option('--export <id>', 'only this export type').argParser(exportId))
    .option('--snapshot <id>', 'only this snapshot, e.g. 2026-11-22T1801Z')
    .option('--deep', 're-hash every landed blob instead of trusting its stored MD5')
    .option('--json', 'print the documented JSON shape')
    .action(async (options: { export?: LandedExportId; snapshot?: string; deep?: boolean; json?: boolean }) => {
      const runtime = openRuntime(global());
      const report = await verifyLanding(runtime, {
        exports: options.export ? [options.export] : landedExports(runtime.config),
        ...(options.snapshot ? { snapshot: options.snapshot } : {}),
        ...(options.deep ? { deep: true } : {}),
      });
      if (options.json) out(JSON.stringify(report, null, 2));
      else {
        for (const f of report.findings) out(`${f.kind.padEnd(24)} ${field(f.path)}  ${field(f.detail)}`);
        out(
          `${report.ok ? 'ok' : 'PROBLEMS'}: ${report.checked.snapshots} snapshots, ${report.checked.blobs} parts checked${report.deep ? `, ${formatBytes(report.checked.bytesHashed)} re-hashed` : ''}, ${report.findings.length} findings`,
        );
      }
      code = report.ok ? 0 : 1;
    });

  program
    .command('derive')
    .description('build curated Parquet and change sets for snapshots that already completed (backfill)')
    .addOption(
      new Option(
        '--exports <list>',
        'comma-separated export ids (default: MDVM_CURATED_EXPORTS and MDVM_CHANGE_SET_EXPORTS)',
      ).argParser(viaFilesList),
    )
    .addOption(new Option('--only <what>', 'build only one of the two').choices(['curated', 'changes']))
    .option('--since <time>', 'only snapshots generated at or after this ISO time')
    .addOption(new Option('--workers <n>', 'parts converted at once').argParser(positiveInt('--workers')).default(4))
    .option('--json', 'print the documented JSON shape')
    .action(
      async (options: {
        exports?: ExportId[];
        only?: 'curated' | 'changes';
        since?: string;
        workers: number;
        json?: boolean;
      }) => {
        code = await deriveCommand(global(), options);
      },
    );

  program
    .command('requeue')
    .description('move poisoned part messages back onto the parts queue, validated again')
    .addOption(new Option('--export <id>', 'only messages of this export type').argParser(exportId))
    .option('--dry-run', 'report what would move, move nothing')
    .option('--json', 'print the documented JSON shape')
    .action(async (options: { export?: LandedExportId; dryRun?: boolean; json?: boolean }) => {
      const runtime = openRuntime(global());
      const report = await requeuePoisoned(runtime, {
        ...(options.export ? { exportId: options.export } : {}),
        ...(options.dryRun ? { dryRun: true } : {}),
      });
      if (options.json) out(JSON.stringify(report, null, 2));
      else {
        for (const e of report.entries) {
          out(`${e.action.padEnd(10)} ${field(e.export ?? '-')} ${field(e.part ?? '-')}  ${field(e.reason)}`);
        }
        out(`${report.dryRun ? 'would move' : 'moved'} ${report.moved}, refused ${report.refused}`);
      }
      code = report.refused > 0 ? 1 : 0;
    });

  try {
    await program.parseAsync(argv);
    return code;
  } catch (error) {
    if (error instanceof CommanderError) {
      // Help and version are "errors" to commander; usage problems were already printed by it.
      return error.exitCode === 0 ? 0 : 2;
    }
    const verbose = global().verbose === true;
    if (error instanceof ConfigError) {
      err(
        verbose ? error.message : `mdvm-ingest: ${error.problems.map((p) => `${p.setting}: ${p.problem}`).join('; ')}`,
      );
      return 2;
    }
    if (error instanceof SettingsFileError) {
      err(`mdvm-ingest: ${error.message}`);
      return 2;
    }
    err(`mdvm-ingest: ${missingResource(error, openedConfig) ?? oneLine(errorMessage(error))}`);
    if (verbose && error instanceof Error && error.stack) err(redact(error.stack));
    return 1;
  }
}

function oneLine(text: string): string {
  return text.replace(/\s*\n\s*/g, ' ').slice(0, 500);
}

main(process.argv).then(
  (code) => process.exit(code),
  (error: unknown) => {
    err(`mdvm-ingest: ${oneLine(errorMessage(error))}`);
    process.exit(1);
  },
);
