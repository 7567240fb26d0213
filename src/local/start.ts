/**
 * `npm start`: the whole pipeline on this machine. Embedded Azurite (two accounts: Microsoft's export
 * storage and the customer's), the Defender API simulator, and the app's real handlers driven by the
 * local runner. Only settings tell the app where things are; it does not know it talks to a simulator.
 */
import { parseArgs } from 'node:util';
import type { ExportId } from '../core/catalog.js';
import { ConfigError, loadConfig } from '../core/config.js';
import { createRuntime } from '../core/runtime.js';
import { ensureStorage } from '../core/storage.js';
import { runIngestion } from '../ops/run.js';
import { formatBytes, renderTable } from '../ops/summary.js';
import { DefenderSimulator } from '../simulator/simulator.js';
import { startAzurite } from './azurite.js';

const HELP = `usage: npm start [-- options]

  --workers N         concurrent queue workers (default 8)
  --persist DIR       keep Azurite's data in DIR, so a later run sees this run's landing and tables
  --records N         records per part file (default 1500)
  --otel              keep the app's OpenTelemetry spans and metrics in memory and print a per-snapshot summary
  --help              this text

Settings (MDVM_COPY_MODE, MDVM_COUNT_RECORDS, MDVM_EXPORTS, MDVM_COPY_SINGLE_SHOT_MAX_MIB, ...) can be
given as environment variables and override the local profile; only the storage connection, the
Defender base URL and MDVM_ALLOW_LOOPBACK are fixed, because they point at the local stack.`;

// The documented VA cadence is six hours: the simulator's snapshot is that of the last 6-hour mark,
// so two runs within the same six hours see the same snapshot.
function currentSnapshotTime(now = new Date()): string {
  const t = new Date(now);
  t.setUTCHours(Math.floor(t.getUTCHours() / 6) * 6, 1, 0, 0);
  if (t > now) t.setUTCHours(t.getUTCHours() - 6);
  return t.toISOString();
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      workers: { type: 'string', default: '8' },
      persist: { type: 'string' },
      records: { type: 'string', default: '1500' },
      otel: { type: 'boolean', default: false },
      help: { type: 'boolean', default: false },
    },
  });
  if (values.help) {
    console.log(HELP);
    return 0;
  }
  const workers = Number(values.workers);
  const records = Number(values.records);
  if (!Number.isInteger(workers) || workers < 1) throw new Error('--workers must be a whole number ≥ 1');
  if (!Number.isInteger(records) || records < 0) throw new Error('--records must be a whole number ≥ 0');

  // Registered before anything creates a span or an instrument; loaded only when asked for (dev dependencies).
  const telemetry = values.otel ? (await import('./localTelemetry.js')).startLocalTelemetry() : undefined;
  const started = Date.now();
  const say = (line: string) => console.log(line);
  say(`mdvm-ingest local run — Node ${process.version}`);
  // Installed before Azurite starts, which runs in its own process group: a Ctrl-C at the terminal reaches only this
  // process, which lets the copies in flight finish and then stops Azurite, at whatever step it comes.
  const controller = new AbortController();
  let interrupts = 0;
  const onSignal = (signal: NodeJS.Signals) => {
    interrupts++;
    // process.exit stops Azurite on the way out (startAzurite's exit hook).
    if (interrupts > 1) process.exit(signal === 'SIGTERM' ? 143 : 130);
    console.error('\ninterrupted: letting copies in flight finish (Ctrl-C again to quit now)');
    controller.abort();
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  // A closed terminal: Azurite, in its own process group, would not get the hang-up; quit, which stops it.
  process.on('SIGHUP', () => process.exit(129));
  let azurite: Awaited<ReturnType<typeof startAzurite>> | undefined;
  let simulator: DefenderSimulator | undefined;
  try {
    azurite = await startAzurite({
      ownProcessGroup: true,
      ...(values.persist
        ? { location: values.persist, accountKey: Buffer.from('mdvm-local-development-key-32byt').toString('base64') }
        : {}),
    });
    say(
      `  Azurite      ${values.persist ? `persisted in ${values.persist}` : 'in memory'}: accounts msexport (plays Microsoft's export storage), customer (landing, queue, tables)`,
    );
    simulator = await DefenderSimulator.start({ source: azurite.source });
    say(`  Simulator    ${simulator.baseUrl} (Defender API + managed identity endpoint)`);

    Object.assign(process.env, simulator.identityEnvironment);
    const env: Record<string, string | undefined> = {
      AzureWebJobsStorage: azurite.customer.connectionString,
      MDVM_LANDING_CONNECTION_STRING: azurite.customer.connectionString,
      MDVM_DEFENDER_API_BASE_URL: simulator.baseUrl,
      MDVM_ALLOW_LOOPBACK: 'true',
      // Small thresholds so the local data exercises the block copy path too.
      MDVM_COPY_SINGLE_SHOT_MAX_MIB: '1',
      MDVM_COPY_BLOCK_SIZE_MIB: '0.25',
    };
    const fixed = new Set(['MDVM_LANDING_CONNECTION_STRING', 'MDVM_DEFENDER_API_BASE_URL', 'MDVM_ALLOW_LOOPBACK']);
    for (const [name, value] of Object.entries(process.env)) {
      if (name.startsWith('MDVM_') && !fixed.has(name) && value !== undefined) env[name] = value;
    }
    const config = loadConfig(env);
    const exports = config.exports as ExportId[];
    const generatedTime = currentSnapshotTime();
    say(
      `  Publishing   ${exports.length} export types, snapshot ${generatedTime.replace('.000Z', 'Z')} (3 RBAC groups, split parts, ${records} records per part)`,
    );
    for (const id of exports) {
      if (controller.signal.aborted) return 1;
      if (!simulator.snapshotOf(id)) {
        await simulator.publish(id, {
          generatedTime,
          recordsPerPart: records,
          ...(id === 'software-vulnerabilities' ? { largePartRecords: records * 12 } : {}),
        });
      }
    }

    const runtime = createRuntime(config);
    await ensureStorage(runtime.storage);

    const tty = process.stdout.isTTY;
    let landedParts = 0;
    let landedBytes = 0;
    const progress = setInterval(
      () => {
        const line = `  copying… ${landedParts} parts, ${formatBytes(landedBytes)} landed`;
        if (tty) process.stdout.write(`\r${line}   `);
        else say(line);
      },
      tty ? 250 : 2000,
    );
    const run = () =>
      runIngestion(runtime, {
        exports,
        workers,
        timeoutInMs: 150_000,
        abortSignal: controller.signal,
        onEvent: (event) => {
          if (event.event === 'part' && event.outcome === 'landed') {
            landedParts++;
            landedBytes += event.bytes ?? 0;
          }
        },
      });

    say('\nRun 1: every timer asks the Defender API for its export, workers copy the parts');
    let first: Awaited<ReturnType<typeof runIngestion>>;
    try {
      first = await run();
    } finally {
      clearInterval(progress);
      if (tty) process.stdout.write('\n');
    }
    say(
      `  landed ${first.partsCopied} parts, ${formatBytes(first.bytesCopied)} in ${first.seconds.toFixed(1)} s with ${workers} workers`,
    );
    say(`\n${renderTable(first.rows, first.throughput, new Map(first.rows.map((r) => [r.exportId, r.note])))}`);
    if (first.interrupted) {
      say('\ninterrupted: nothing is half-written; with --persist the next run resumes');
      return 1;
    }

    say('\nRun 2: the same snapshots again');
    const second = await run();
    const unchanged = second.rows.filter((r) => r.tick === 'unchanged').length;
    say(`  ${unchanged}/${exports.length} exports unchanged; ${second.partsCopied} parts copied`);

    say(`\nLanded in the customer account, container '${config.landing.container}':`);
    for (const r of first.rows) if (r.manifest) say(`  ${r.manifest}`);
    say(
      `  (+ {export}/_latest.json for each export; manifest rows in tables '${config.snapshotsTable}' and '${config.partsTable}')`,
    );
    say('  The same run against any deployment: npx mdvm-ingest run (see README "Operating it")');
    const derived: string[] = [];
    for (const prefix of ['curated/', 'changes/']) {
      for await (const blob of runtime.landing.listBlobsFlat({ prefix })) {
        if (blob.name.endsWith('/_manifest.json')) derived.push(blob.name);
      }
    }
    if (derived.length > 0) {
      say('\nDerived data (MDVM_CURATED_EXPORTS, MDVM_CHANGE_SET_EXPORTS; docs/downstream/README.md):');
      for (const name of derived) say(`  ${name}`);
    }

    if (telemetry) say(`\n${await telemetry.summary()}`);
    const complete = second.rows.filter((r) => r.status === 'complete').length;
    say(`\n${complete}/${exports.length} export types complete in ${((Date.now() - started) / 1000).toFixed(1)} s`);
    return second.ok && first.ok ? 0 : 1;
  } finally {
    await simulator?.stop();
    await azurite?.stop();
  }
}

main().then(
  (code) => process.exit(code),
  (error: unknown) => {
    if (error instanceof ConfigError) console.error(error.message);
    else console.error(`npm start failed: ${(error as Error).message}`);
    process.exit(1);
  },
);
