import { execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DELTA_EXPORT, EXPORT_IDS } from '../../src/core/catalog.js';
import type { DeadLetter } from '../../src/core/messages.js';
import { NODE_ARGUMENTS } from '../../src/deploy/nodeArguments.js';
import { curatedPartPath as curatedPathOf } from '../../src/derive/contracts.js';
import type { BackfillReport } from '../../src/ops/derive.js';
import type { RequeueReport } from '../../src/ops/requeue.js';
import type { StatusReport } from '../../src/ops/status.js';
import type { VerifyReport } from '../../src/ops/verify.js';
import { createApp, listBlobNames, type Stack, startStack, type TestApp, tableRows } from '../helpers/stack.js';

const CLI = new URL('../../dist/src/cli/main.js', import.meta.url).pathname;
let stack: Stack;
/** Everything every CLI run printed: checked for secrets at the end. */
const printed: string[] = [];

beforeAll(async () => {
  stack = await startStack();
});
afterAll(async () => {
  const text = printed.join('\n');
  for (const secret of stack.simulator.issuedSecrets) expect(text).not.toContain(secret);
  expect(text).not.toMatch(/sig=(?!<redacted>)[A-Za-z0-9%]/);
  await stack?.stop();
});

interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Run the built CLI as a child process (async: the simulator lives in this process). */
function cli(
  args: string[],
  env: Record<string, string>,
  options: {
    onSpawn?: (kill: (signal?: NodeJS.Signals) => void) => void;
    /** How to start the CLI, default this Node with the built file. */
    command?: readonly [string, ...string[]];
  } = {},
): Promise<CliResult> {
  const [program, ...programArgs] = options.command ?? [process.execPath, CLI];
  return new Promise((resolve, reject) => {
    const child = spawn(program, [...programArgs, ...args], {
      env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '', ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => {
      stdout += d.toString();
    });
    child.stderr.on('data', (d: Buffer) => {
      stderr += d.toString();
    });
    child.on('error', reject);
    child.on('exit', (code) => {
      printed.push(stdout, stderr);
      resolve({ code, stdout, stderr });
    });
    options.onSpawn?.((signal = 'SIGINT') => child.kill(signal));
  });
}

/** Sends `signal` to the CLI child once `parts` parts of the app have landed (read from the parts table). */
function signalOnceLanded(app: TestApp, parts: number, signal: NodeJS.Signals) {
  let sent = false;
  return {
    sent: () => sent,
    onSpawn: (kill: (signal?: NodeJS.Signals) => void) => {
      const poll = setInterval(async () => {
        const landed = (await tableRows(app.runtime.storage.partsTable)).filter((p) => p.status === 'landed').length;
        if (landed >= parts && !sent) {
          sent = true;
          clearInterval(poll);
          kill(signal);
        }
      }, 20);
    },
  };
}

async function appFor(exports: string): Promise<TestApp> {
  return createApp(stack, { MDVM_EXPORTS: exports });
}

describe('mdvm-ingest CLI (built, as a child process)', () => {
  it('starts as its bin does, through its #! line: the project Node with the V8 flags of nodeArguments.ts', async () => {
    const shebang = readFileSync(CLI, 'utf8').split('\n', 1)[0] ?? '';
    expect(shebang).toBe(`#!/usr/bin/env -S node ${NODE_ARGUMENTS.join(' ')}`);
    // What the kernel and `env -S` do with that line, with the project's own Node first on PATH as under npx.
    // The kernel passes everything after the interpreter as one argument.
    const [interpreter = '', ...rest] = shebang.slice(2).split(' ');
    const bin = new URL('../../node_modules/.bin', import.meta.url).pathname;
    const result = await cli(
      ['run', '--help'],
      { PATH: `${bin}:${process.env.PATH ?? ''}` },
      { command: [interpreter, rest.join(' '), CLI] },
    );
    expect(result.stdout).toMatch(/Usage: mdvm-ingest run/);
    expect(result.code).toBe(0);
  });

  it('run lands all nine export types and exits 0; a second run copies nothing and says so', async () => {
    const app = await createApp(stack);
    for (const id of EXPORT_IDS) {
      await stack.simulator.publish(id, { generatedTime: '2026-11-16T18:01:00Z', recordsPerPart: 10 });
    }
    stack.simulator.resetRateLimits();
    const first = await cli(['run', '--workers', '6'], app.env);
    expect(first.stderr).toBe('');
    expect(first.code).toBe(0);
    for (const id of EXPORT_IDS)
      expect(first.stdout).toMatch(new RegExp(`${id}\\s+2026-11-16T1801Z\\s+\\d+/\\d+.*complete`));
    const snapshots = await tableRows(app.runtime.storage.snapshotsTable);
    expect(snapshots.map((s) => s.status)).toEqual(EXPORT_IDS.map(() => 'complete'));

    const second = await cli(['run'], app.env);
    expect(second.code).toBe(0);
    expect(second.stdout).toMatch(/^0 parts, 0 B copied/m);
    expect(second.stdout.match(/unchanged — nothing copied/g)).toHaveLength(9);
  });

  it('run with one export SAS-expired exits non-zero saying why; the next run completes it without copying landed parts again', async () => {
    const app = await appFor('certificates,browser-extensions');
    await stack.simulator.publish('certificates', { generatedTime: '2026-11-16T12:01:00Z', recordsPerPart: 10 });
    await stack.simulator.publish('browser-extensions', { generatedTime: '2026-11-16T12:01:00Z', recordsPerPart: 10 });
    stack.simulator.resetRateLimits();
    stack.simulator.injectFault('certificates', { kind: 'expired-sas', parts: 2 });
    const first = await cli(['run'], app.env);
    expect(first.code).toBe(1);
    expect(first.stdout).toMatch(/certificates .*7\/9 parts, 2 expired — next run resumes$/m);
    expect(first.stdout).toMatch(/browser-extensions .*complete/);

    const second = await cli(['run'], app.env);
    expect(second.code).toBe(0);
    expect(second.stdout).toMatch(/^2 parts, .* copied/m);
    expect(second.stdout).toMatch(/certificates .*resumed and completed/);
    const parts = await tableRows(app.runtime.storage.partsTable);
    expect(parts.filter((p) => p.partitionKey === 'certificates_2026-11-16T1201Z').every((p) => p.attempts === 1)).toBe(
      true,
    );
  });

  it('status --json matches the tables', async () => {
    const app = await appFor('hardware-firmware,information-gathering');
    await stack.simulator.publish('hardware-firmware', { generatedTime: '2026-11-15T00:01:00Z', recordsPerPart: 5 });
    await stack.simulator.publish('information-gathering', {
      generatedTime: '2026-11-15T00:01:00Z',
      recordsPerPart: 5,
    });
    stack.simulator.injectFault('information-gathering', { kind: 'missing-blob' });
    stack.simulator.resetRateLimits();
    await cli(['run'], app.env);
    const result = await cli(['status', '--json'], app.env);
    expect(result.code).toBe(1);
    const report = JSON.parse(result.stdout) as StatusReport;
    expect(report.v).toBe(1);
    const rows = await tableRows(app.runtime.storage.snapshotsTable);
    for (const e of report.exports) {
      const row = rows.find((r) => r.partitionKey === e.export);
      expect(e).toMatchObject({
        snapshot: row?.snapshotId,
        generatedTime: row?.rowKey,
        status: row?.status,
        partsLanded: row?.partsLanded,
        partCount: row?.partCount,
        bytes: row?.bytesLanded,
      });
      expect(e.ageMinutes).toBeGreaterThan(0);
    }
    expect(report.exports.find((e) => e.export === 'information-gathering')).toMatchObject({
      status: 'failed',
      lastError: expect.stringMatching(/_RbacGroupId=99/),
    });
    const plain = await cli(['status'], app.env);
    expect(plain.stdout).toMatch(/hardware-firmware\s+2026-11-15T0001Z\s+complete/);
  });

  it('verify: 0 on an intact landing, non-zero after a blob is deleted or overwritten with other bytes', async () => {
    const app = await appFor('secure-configuration');
    await stack.simulator.publish('secure-configuration', {
      generatedTime: '2026-11-15T06:01:00Z',
      recordsPerPart: 30,
    });
    stack.simulator.resetRateLimits();
    expect((await cli(['run'], app.env)).code).toBe(0);
    const intact = await cli(['verify', '--json'], app.env);
    expect(intact.code).toBe(0);
    expect(JSON.parse(intact.stdout)).toMatchObject({ ok: true, findings: [], checked: { snapshots: 1, blobs: 9 } });
    expect((await cli(['verify', '--deep'], app.env)).code).toBe(0);

    const parts = (await tableRows(app.runtime.storage.partsTable)).map((p) => String(p.landingPath)).sort();
    const [deleted, overwritten] = parts;
    if (!deleted || !overwritten) throw new Error('expected parts');
    await app.runtime.landing.getBlockBlobClient(deleted).delete();
    const afterDelete = await cli(['verify', '--json'], app.env);
    expect(afterDelete.code).toBe(1);
    expect((JSON.parse(afterDelete.stdout) as VerifyReport).findings).toEqual([
      expect.objectContaining({ kind: 'missing', path: deleted }),
    ]);

    const blob = app.runtime.landing.getBlockBlobClient(overwritten);
    const original = await blob.downloadToBuffer();
    const other = Buffer.from(original.map((b) => b ^ 0xff));
    await blob.uploadData(other);
    const afterOverwrite = await cli(['verify', '--export', 'secure-configuration', '--json'], app.env);
    expect(afterOverwrite.code).toBe(1);
    expect((JSON.parse(afterOverwrite.stdout) as VerifyReport).findings).toContainEqual(
      expect.objectContaining({ kind: 'md5-mismatch', path: overwritten }),
    );
    const plain = await cli(
      ['verify', '--deep', '--snapshot', '2026-11-15T0601Z', '--export', 'secure-configuration'],
      app.env,
    );
    expect(plain.code).toBe(1);
    expect(plain.stdout).toMatch(/^PROBLEMS: 1 snapshots, 9 parts checked/m);
  });

  it('requeue brings a poisoned message back and it lands; a dead letter is refused with its reason', async () => {
    const app = await appFor('software-inventory');
    await stack.simulator.publish('software-inventory', { generatedTime: '2026-11-15T12:01:00Z', recordsPerPart: 5 });
    stack.simulator.resetRateLimits();
    await app.runner.tick();
    // The host gave up on every message (5 failed deliveries) and parked them on the poison queue.
    let moved = 0;
    for (;;) {
      const batch = await app.runtime.queue.receiveMessages({ numberOfMessages: 32 });
      if (batch.receivedMessageItems.length === 0) break;
      for (const m of batch.receivedMessageItems) {
        await app.runtime.poisonQueue.sendMessage(m.messageText);
        await app.runtime.queue.deleteMessage(m.messageId, m.popReceipt);
        moved++;
      }
    }
    const letter: DeadLetter = {
      v: 1,
      reason: 'message is not JSON',
      deadLetteredAt: new Date().toISOString(),
      original: 'x',
    };
    await app.runtime.poisonQueue.sendMessage(Buffer.from(JSON.stringify(letter)).toString('base64'));

    const dry = await cli(['requeue', '--dry-run', '--json'], app.env);
    const dryReport = JSON.parse(dry.stdout) as RequeueReport;
    expect(dryReport).toMatchObject({ dryRun: true, moved, refused: 1 });
    expect((await app.runtime.queue.getProperties()).approximateMessagesCount).toBe(0);

    const real = await cli(['requeue'], app.env);
    expect(real.code).toBe(1);
    expect(real.stdout).toMatch(new RegExp(`moved ${moved}, refused 1`));
    expect(real.stdout).toMatch(/refused .*dead-lettered by the app \(message is not JSON\)/);
    expect((await app.runtime.poisonQueue.getProperties()).approximateMessagesCount).toBe(1);

    const run = await cli(['run', '--exports', 'software-inventory'], app.env);
    expect(run.code).toBe(0);
    expect(run.stdout).toMatch(new RegExp(`^${moved} parts`, 'm'));
    expect((await tableRows(app.runtime.storage.snapshotsTable))[0]).toMatchObject({ status: 'complete' });
  });

  it('Ctrl-C during run stops cleanly and the next run resumes', async () => {
    const app = await appFor('software-vulnerabilities');
    await stack.simulator.publish('software-vulnerabilities', {
      generatedTime: '2026-11-14T18:01:00Z',
      groups: [0, 12, 31, 44, 51, 52, 53, 54],
      partsPerGroup: 4,
      recordsPerPart: 400,
    });
    stack.simulator.resetRateLimits();
    const signal = signalOnceLanded(app, 2, 'SIGINT');
    const first = await cli(['run', '--workers', '1'], { ...app.env, MDVM_COPY_MODE: 'stream' }, signal);
    expect(signal.sent()).toBe(true);
    expect(first.code).toBe(1);
    expect(first.stderr).toMatch(/interrupted: letting copies in flight finish/);
    expect(first.stdout).toMatch(/next run resumes|run again to resume/);
    const names: string[] = [];
    for await (const b of app.runtime.landing.listBlobsFlat({ prefix: 'software-vulnerabilities/' }))
      names.push(b.name);
    expect(names.some((n) => n.endsWith('_manifest.json'))).toBe(false);

    const second = await cli(['run'], app.env);
    expect(second.code).toBe(0);
    expect((await tableRows(app.runtime.storage.snapshotsTable))[0]).toMatchObject({ status: 'complete' });
    const parts = await tableRows(app.runtime.storage.partsTable);
    expect(parts.every((p) => p.status === 'landed')).toBe(true);
  });

  it('SIGTERM during run stops as cleanly as Ctrl-C', async () => {
    const app = await appFor('hardware-firmware');
    await stack.simulator.publish('hardware-firmware', {
      generatedTime: '2026-11-14T19:01:00Z',
      groups: [0, 12, 31, 44],
      partsPerGroup: 4,
      recordsPerPart: 400,
    });
    stack.simulator.resetRateLimits();
    const signal = signalOnceLanded(app, 1, 'SIGTERM');
    const run = await cli(['run', '--workers', '1'], { ...app.env, MDVM_COPY_MODE: 'stream' }, signal);
    expect(signal.sent()).toBe(true);
    expect(run.code).toBe(1);
    expect(run.stderr).toMatch(/interrupted: letting copies in flight finish/);
    expect(run.stdout).toMatch(/interrupted: nothing is half-written/);
  });

  it('kill -9 mid-copy: the next run resumes within its timeout (the dead run held its messages only briefly)', async () => {
    const app = await appFor('security-baselines');
    await stack.simulator.publish('security-baselines', {
      generatedTime: '2026-11-14T20:01:00Z',
      groups: [0, 12, 31, 44],
      partsPerGroup: 3,
      recordsPerPart: 400,
    });
    stack.simulator.resetRateLimits();
    const signal = signalOnceLanded(app, 2, 'SIGKILL');
    const first = await cli(['run', '--workers', '2'], { ...app.env, MDVM_COPY_MODE: 'stream' }, signal);
    expect(signal.sent()).toBe(true);
    expect(first.code).toBeNull();
    // With the old two-minute lease the parts the dead run held stayed hidden past this run's timeout.
    const second = await cli(['run', '--timeout-s', '75'], app.env);
    expect(second.code).toBe(0);
    expect((await tableRows(app.runtime.storage.snapshotsTable))[0]).toMatchObject({ status: 'complete' });
  });

  it('requeue judges a poison queue holding null and forged text without crashing or printing lines of its own', async () => {
    const app = await appFor('certificates');
    const send = (text: string) => app.runtime.poisonQueue.sendMessage(Buffer.from(text).toString('base64'));
    await send('null');
    await send(
      JSON.stringify({
        v: 1,
        reason: 'x\nmoved 3, refused 0\u001b[2J',
        deadLetteredAt: new Date().toISOString(),
        original: 'x',
      }),
    );
    const result = await cli(['requeue', '--dry-run'], app.env);
    expect(result.code).toBe(1);
    const lines = result.stdout.trim().split('\n');
    expect(lines).toHaveLength(3);
    expect(lines[0]).toMatch(/^refused +- - {2}not a JSON object$/);
    expect(lines[1]).not.toContain('\u001b');
    expect(lines[2]).toBe('would move 0, refused 2');
  });

  it('status and verify print one line per export and per finding, whatever text a row or blob name holds', async () => {
    const app = await appFor('certificates');
    await stack.simulator.publish('certificates', { generatedTime: '2026-11-14T06:01:00Z', recordsPerPart: 3 });
    stack.simulator.resetRateLimits();
    expect((await cli(['run'], app.env)).code).toBe(0);
    const forged = 'ok: 9 snapshots, 9 parts checked, 0 findings';
    // A stored error holds whatever a service answered; a blob name whatever someone with write access chose.
    await app.runtime.store.mutateSnapshot('certificates', '2026-11-14T06:01:00Z', () => ({
      lastError: `boom\n${forged}\r\u001b[2J`,
    }));
    await app.runtime.landing
      .getBlockBlobClient(`certificates/snapshot=2026-11-14T0601Z/x\n${forged}\t[2J`)
      .upload('x', 1);

    const status = await cli(['status'], app.env);
    const statusLines = status.stdout.trim().split('\n');
    expect(statusLines).toHaveLength(3);
    expect(statusLines[2]).toMatch(/^certificates .*boom ok: 9 snapshots/);
    expect(status.stdout).not.toContain('\u001b');
    expect(status.stdout).not.toContain('\r');

    const verify = await cli(['verify'], app.env);
    expect(verify.code).toBe(1);
    const verifyLines = verify.stdout.trim().split('\n');
    expect(verifyLines).toEqual([
      expect.stringMatching(
        /^extra +certificates\/snapshot=2026-11-14T0601Z\/x\?ok: 9 snapshots.*findings\?\[2J {2}in the snapshot folder but in no manifest$/,
      ),
      expect.stringMatching(/^PROBLEMS: 1 snapshots, \d+ parts checked, 1 findings$/),
    ]);
  });

  it('names the container, table or queue that is gone, and its setting, instead of a raw 404', async () => {
    const app = await appFor('certificates');
    await stack.simulator.publish('certificates', { generatedTime: '2026-11-13T02:01:00Z', recordsPerPart: 3 });
    stack.simulator.resetRateLimits();
    await app.runner.tick();
    await app.runner.drain();
    await app.runtime.storage.poisonQueue.delete();
    const requeue = await cli(['requeue'], app.env);
    expect(requeue.code).toBe(1);
    expect(requeue.stderr).toMatch(/MDVM_PARTS_QUEUE/);
    await app.runtime.landing.delete();
    const verify = await cli(['verify'], app.env);
    expect(verify.stderr).toMatch(
      /the landing container 'landing-[0-9a-f]+' \(MDVM_LANDING_CONTAINER\) does not exist/,
    );
    await app.runtime.storage.snapshotsTable.deleteTable();
    const status = await cli(['status'], app.env);
    expect(status.code).toBe(1);
    expect(status.stderr).toMatch(/MDVM_SNAPSHOTS_TABLE/);
    for (const result of [requeue, verify, status]) expect(result.stderr.trim().split('\n')).toHaveLength(1);
  });

  it('run says why the delta did not start', async () => {
    const app = await createApp(stack, {
      MDVM_EXPORTS: 'software-vulnerabilities',
      MDVM_DELTA_SCHEDULE: '0 30 */6 * * *',
    });
    const result = await cli(['run', '--exports', DELTA_EXPORT.id], app.env);
    expect(result.stdout).toMatch(
      /no watermark yet: the delta starts from a complete software-vulnerabilities snapshot/,
    );
  });

  it('bad input: one line naming what is wrong, non-zero exit, no stack trace unless --verbose', async () => {
    const app = await appFor('certificates');
    const unknown = await cli(['run', '--exports', 'everything'], app.env);
    expect(unknown.code).toBe(2);
    expect(unknown.stderr).toMatch(/unknown export type 'everything'; expected "all" or/);

    const badFlag = await cli(['status', '--colour'], app.env);
    expect(badFlag.code).toBe(2);
    expect(badFlag.stderr).toMatch(/unknown option '--colour'/);

    const badSetting = await cli(['status'], { ...app.env, MDVM_COPY_MODE: 'warp' });
    expect(badSetting.code).toBe(2);
    expect(badSetting.stderr.trim().split('\n')).toEqual([expect.stringMatching(/^mdvm-ingest: MDVM_COPY_MODE: /)]);

    const unreachable = await cli(['status'], {
      ...app.env,
      AzureWebJobsStorage:
        app.env.AzureWebJobsStorage?.replace(
          /TableEndpoint=http:\/\/127\.0\.0\.1:\d+/,
          'TableEndpoint=http://127.0.0.1:9',
        ) ?? '',
      MDVM_LANDING_CONNECTION_STRING: app.env.MDVM_LANDING_CONNECTION_STRING ?? '',
    });
    expect(unreachable.code).toBe(1);
    expect(unreachable.stderr.trim().split('\n')).toHaveLength(1);
    expect(unreachable.stderr).toMatch(/^mdvm-ingest: .*(ECONNREFUSED|connect)/);
    expect(unreachable.stderr).not.toMatch(/\n\s+at /);

    await stack.simulator.publish('certificates', { generatedTime: '2026-11-14T00:01:00Z', recordsPerPart: 3 });
    stack.simulator.resetRateLimits();
    const wrongCredential = await cli(['run'], { ...app.env, IDENTITY_HEADER: 'not-the-secret' });
    expect(wrongCredential.code).toBe(1);
    expect(wrongCredential.stdout).toMatch(/certificates .*could not get a token/);

    // One export where one is meant: never the first of a list, silently.
    const twoExports = await cli(['verify', '--export', 'certificates,secure-configuration'], app.env);
    expect(twoExports.code).toBe(2);
    expect(twoExports.stderr).toMatch(/one export id \(got 2/);
    // Past Node's timer limit the run would give up at once.
    const hugeTimeout = await cli(['run', '--timeout-s', '3000000'], app.env);
    expect(hugeTimeout.code).toBe(2);
    expect(hugeTimeout.stderr).toMatch(/--timeout-s must be a whole number from 1 to 2147483/);

    const settingsMissing = await cli(['--settings', '/nonexistent/local.settings.json', 'status'], app.env);
    expect(settingsMissing.code).toBe(2);
    expect(settingsMissing.stderr).toMatch(/--settings \/nonexistent\/local.settings.json: no such file/);

    const verbose = await cli(['--verbose', 'status'], {
      ...app.env,
      AzureWebJobsStorage:
        app.env.AzureWebJobsStorage?.replace(
          /TableEndpoint=http:\/\/127\.0\.0\.1:\d+/,
          'TableEndpoint=http://127.0.0.1:9',
        ) ?? '',
    });
    expect(verbose.stderr).toMatch(/\n\s+at /);
  });

  it('--json shapes are the documented v1 shapes', async () => {
    const app = await appFor('software-inventory-noncpe');
    await stack.simulator.publish('software-inventory-noncpe', {
      generatedTime: '2026-11-13T00:01:00Z',
      recordsPerPart: 3,
    });
    stack.simulator.resetRateLimits();
    await cli(['run'], app.env);
    const keys = (o: object) => Object.keys(o).sort();
    const status = JSON.parse((await cli(['status', '--json'], app.env)).stdout) as StatusReport;
    expect(keys(status)).toEqual(['exports', 'generatedAt', 'v']);
    expect(keys(status.exports[0] ?? {})).toEqual([
      'ageMinutes',
      'bytes',
      'completedAt',
      'export',
      'generatedTime',
      'incomplete',
      'lastComplete',
      'lastError',
      'partCount',
      'partsLanded',
      'snapshot',
      'status',
    ]);
    const verify = JSON.parse((await cli(['verify', '--json'], app.env)).stdout) as VerifyReport;
    expect(keys(verify)).toEqual(['checked', 'deep', 'findings', 'ok', 'v']);
    expect(keys(verify.checked)).toEqual(['blobs', 'bytesHashed', 'snapshots']);
    const requeue = JSON.parse((await cli(['requeue', '--json'], app.env)).stdout) as RequeueReport;
    expect(keys(requeue)).toEqual(['dryRun', 'entries', 'moved', 'refused', 'v']);
  });

  it('reads settings from a .env or local.settings.json file, the environment winning', async () => {
    const app = await appFor('certificates');
    const dir = mkdtempSync(join(tmpdir(), 'mdvm-cli-'));
    const dotenv = join(dir, 'mdvm.env');
    writeFileSync(
      dotenv,
      Object.entries(app.env)
        .map(([k, v]) => `${k}="${v}"`)
        .join('\n'),
    );
    const fromEnvFile = await cli(['--settings', dotenv, 'status', '--json'], {});
    expect(fromEnvFile.stderr).toBe('');
    expect((JSON.parse(fromEnvFile.stdout) as StatusReport).exports.map((e) => e.export)).toEqual(['certificates']);
    const json = join(dir, 'local.settings.json');
    writeFileSync(json, JSON.stringify({ IsEncrypted: false, Values: app.env }));
    const overridden = await cli(['--settings', json, 'status', '--json'], { MDVM_EXPORTS: 'hardware-firmware' });
    expect((JSON.parse(overridden.stdout) as StatusReport).exports.map((e) => e.export)).toEqual(['hardware-firmware']);
    // An empty variable is not a value: the file's setting stands (not the default).
    const blank = await cli(['--settings', json, 'status', '--json'], { MDVM_EXPORTS: '', MDVM_SNAPSHOTS_TABLE: ' ' });
    expect((JSON.parse(blank.stdout) as StatusReport).exports.map((e) => e.export)).toEqual(['certificates']);
    // The credential reads the process environment itself: an empty identity variable must not hide the file's.
    await stack.simulator.publish('certificates', { generatedTime: '2026-11-16T19:01:00Z', recordsPerPart: 2 });
    stack.simulator.resetRateLimits();
    const blankIdentity = Object.fromEntries(Object.keys(stack.simulator.identityEnvironment).map((k) => [k, '']));
    const ran = await cli(['--settings', json, 'run'], blankIdentity);
    expect(ran.stderr).toBe('');
    expect(ran.code).toBe(0);
    expect(ran.stdout).toMatch(/certificates\s+2026-11-16T1901Z\s+\d+\/\d+.*complete/);
    rmSync(dir, { recursive: true, force: true });
  });

  it('run completes exactly while another consumer (a deployed app) takes messages from the same queue', async () => {
    const app = await appFor('security-baselines');
    const snap = await stack.simulator.publish('security-baselines', {
      generatedTime: '2026-11-12T18:01:00Z',
      groups: [0, 12, 31, 44, 51],
      partsPerGroup: 3,
      recordsPerPart: 50,
    });
    stack.simulator.resetRateLimits();
    let cliDone = false;
    const other = (async () => {
      while (!cliDone) {
        await app.runner.drain({ timeoutInMs: 5_000 });
        await new Promise((r) => setTimeout(r, 20));
      }
    })();
    const result = await cli(['run', '--workers', '2'], app.env);
    cliDone = true;
    await other;
    expect(result.code).toBe(0);
    const [snapshot] = await tableRows(app.runtime.storage.snapshotsTable);
    expect(snapshot).toMatchObject({
      status: 'complete',
      partsLanded: snap.parts.length,
      partCount: snap.parts.length,
    });
    const landedHere = app.events.filter((e) => e.event === 'part' && e.outcome === 'landed').length;
    const landedByCli = Number(result.stdout.match(/^(\d+) parts/m)?.[1]);
    expect(landedHere).toBeGreaterThan(0);
    expect(landedByCli).toBeGreaterThan(0);
    expect(landedHere + landedByCli).toBe(snap.parts.length);
    const names: string[] = [];
    for await (const b of app.runtime.landing.listBlobsFlat({ prefix: 'security-baselines/' })) names.push(b.name);
    expect(names.filter((n) => n.endsWith('_manifest.json'))).toHaveLength(1);
  });

  it('on a Node.js before 22 says which Node it needs, instead of failing inside a library', async (context) => {
    // An older Node on this machine's PATH (the project's own 22 comes first under npm and npx).
    const older = (process.env.PATH ?? '')
      .split(':')
      .map((dir) => join(dir, 'node'))
      .find((file) => {
        try {
          return Number(execFileSync(file, ['-p', 'process.versions.node.split(".")[0]']).toString()) < 22;
        } catch {
          return false;
        }
      });
    if (!older) return context.skip('no Node.js before 22 on PATH');
    const result = await cli(['status'], {}, { command: [older, CLI] });
    expect(result.code).toBe(2);
    expect(result.stderr).toMatch(/^mdvm-ingest: needs Node\.js 22 \(this is v\d+\.[\d.]+\)/);
    expect(result.stdout).toBe('');
  });

  it('--help on every command', async () => {
    for (const command of [[], ['run'], ['status'], ['verify'], ['requeue']]) {
      const result = await cli([...command, '--help'], {});
      expect(result.code).toBe(0);
      expect(result.stdout).toMatch(/^Usage: mdvm-ingest/);
    }
  });
  it('derive backfills curated Parquet and change sets for snapshots that completed before, reports progress, and skips what exists', async () => {
    const app = await appFor('secure-configuration');
    for (const generatedTime of ['2026-11-10T06:01:00Z', '2026-11-11T06:01:00Z']) {
      await stack.simulator.publish('secure-configuration', { generatedTime, recordsPerPart: 20 });
      await app.runner.tick();
      await app.runner.drain();
    }
    const first = await cli(['derive', '--exports', 'secure-configuration', '--json'], app.env);
    expect(first.stderr).toBe('');
    expect(first.code).toBe(0);
    const report = JSON.parse(first.stdout) as BackfillReport & { v: number };
    expect(report.v).toBe(1);
    expect(report.snapshots).toBe(2);
    expect(report.curatedParts).toMatchObject({ built: report.curatedParts.total, failed: 0, rows: 2 * 9 * 20 });
    expect(report.changeSets).toMatchObject({ total: 2, built: 2, failed: 0 });
    const names = await listBlobNames(app);
    expect(names.filter((n) => /^(curated|changes)\/.*_manifest\.json$/.test(n))).toHaveLength(4);

    const again = await cli(['derive', '--exports', 'secure-configuration'], app.env);
    expect(again.code).toBe(0);
    expect(again.stdout).toMatch(/curated parts 18\/18 \(360 rows\); change sets 2\/2/);
    expect(again.stdout).toMatch(/built 0 curated parts and 0 change sets; 20 already there; 0 failed/);

    // A raw part gone since its snapshot completed: that snapshot's curated copy cannot be made, and the command says so.
    const gone =
      names.find((n) => n.startsWith('secure-configuration/snapshot=2026-11-11T0601Z/') && n.endsWith('.json.gz')) ??
      '';
    await app.runtime.landing.getBlobClient(curatedPathOf(gone)).delete();
    await app.runtime.landing.getBlobClient(gone).delete();
    const broken = await cli(['derive', '--exports', 'secure-configuration', '--only', 'curated'], app.env);
    expect(broken.code).toBe(1);
    expect(broken.stdout).toContain(
      `failed  secure-configuration 2026-11-11T0601Z ${gone}: ${gone} is listed by its manifest but is not in the landing container`,
    );

    const bad = await cli(['derive', '--since', 'last tuesday'], app.env);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/--since 'last tuesday' is not an ISO time/);
    for (const since of ['1', '2026-11-01T00:00', '2026-02-30']) {
      const refused = await cli(['derive', '--since', since], app.env);
      expect(refused.code).toBe(2);
      expect(refused.stderr).toContain(`--since '${since}' is not an ISO time`);
    }
    // Without --exports it builds what the settings opt in to; with nothing opted in it says so.
    const nothing = await cli(['derive'], app.env);
    expect(nothing.code).toBe(2);
    expect(nothing.stderr).toMatch(/nothing to build: pass --exports, or set MDVM_CURATED_EXPORTS/);
    const fromSettings = await cli(['derive', '--json'], {
      ...app.env,
      MDVM_CHANGE_SET_EXPORTS: 'secure-configuration',
    });
    expect(fromSettings.code).toBe(0);
    expect(JSON.parse(fromSettings.stdout)).toMatchObject({
      curatedParts: { total: 0 },
      changeSets: { total: 2, existing: 2 },
    });
  });
});
