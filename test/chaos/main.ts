/**
 * `npm run chaos`: the fault suite. Drives the real handlers (through the in-process host, and the built CLI as a
 * child process where a process must die) against Azurite and the Defender simulator through every hostile or
 * unlucky case we know, then judges the end state of each scenario by comparing the source account with the
 * landing account, the tables and every manifest, and by scanning everything the app wrote or printed for every
 * signature, token and key the run issued. Ends with one line:
 *
 *   chaos: N scenarios, P parts, L lost, D duplicated, M manifests wrong, S secrets leaked
 *
 * and exits 1 when any of those is not 0 or a scenario's own expectation fails.
 *
 * - lost: a part a complete snapshot's source holds that is not in its manifest and landed byte-exact, or a part row
 *   that says landed while its blob is missing or different.
 * - duplicated: a blob in a snapshot folder that no part row records, or a part listed twice in a manifest.
 * - manifests wrong: a _manifest.json that breaks its contract, lists anything but the landed rows, names a blob
 *   that is not there with its length and MD5, exists for a snapshot that is not complete, or is missing for one
 *   that is; a _latest.json behind the newest complete snapshot.
 * - secrets leaked: an issued SAS signature, identity token or account key in a log line, telemetry event, span,
 *   metric, OpenTelemetry log record, error, table row, blob name or metadata, manifest or pointer, dead letter, or
 *   CLI output. (Part messages on the parts queue, and the ones the host parks unchanged on the poison queue for
 *   `requeue`, carry their SAS by design.)
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { gunzipSync } from 'node:zlib';
import { BlobClient, BlobSASPermissions, BlobServiceClient, BlockBlobClient } from '@azure/storage-blob';
import type { ExportId } from '../../src/core/catalog.js';
import { latestSchema, manifestSchema, parseJson, type SnapshotManifest } from '../../src/core/contracts.js';
import { MdvmError } from '../../src/core/errors.js';
import { encodeMessage, type PartMessage } from '../../src/core/messages.js';
import { compareGeneratedTime, latestPath } from '../../src/core/parts.js';
import {
  CHANGES_PREFIX,
  CURATED_PREFIX,
  changeSetManifestSchema,
  changesManifestPath,
  curatedManifestPath,
  curatedManifestSchema,
  sourceDigest,
} from '../../src/derive/contracts.js';
import { requeuePoisoned } from '../../src/ops/requeue.js';
import { runIngestion } from '../../src/ops/run.js';
import type { SimulatedSnapshot } from '../../src/simulator/simulator.js';
import { captureOpenTelemetry } from '../helpers/otel.js';
import {
  createApp,
  duplicateQueuedMessages,
  listBlobNames,
  type Stack,
  startStack,
  type TestApp,
  tableRows,
} from '../helpers/stack.js';

const HERE = dirname(fileURLToPath(import.meta.url));
const CLI = join(HERE, '..', '..', 'src', 'cli', 'main.js');

interface Scenario {
  readonly name: string;
  /** Runs the faults; returns the apps whose end state is judged and the snapshots whose source is the truth. */
  run(ctx: Context): Promise<void>;
}

interface Context {
  readonly stack: Stack;
  /** Judge this app's landing and tables at the end of the scenario. */
  judge(app: TestApp): void;
  /** Record text the app printed or threw (CLI output, errors) for the secret scan. */
  captured(text: string): void;
  /** A scenario's own expectation. */
  expect(ok: boolean, what: string): void;
}

const totals = { scenarios: 0, parts: 0, lost: 0, duplicated: 0, manifestsWrong: 0, secretsLeaked: 0 };
const problems: string[] = [];

function md5(bytes: Buffer): string {
  return createHash('md5').update(bytes).digest('base64');
}

async function settle(app: TestApp, stack: Stack, rounds = 3): Promise<void> {
  for (let i = 0; i < rounds; i++) {
    stack.simulator.resetRateLimits();
    await app.runner.tick();
    await app.runner.drain();
  }
}

async function takeAll(app: TestApp): Promise<string[]> {
  const texts: string[] = [];
  for (;;) {
    const batch = await app.runtime.queue.receiveMessages({ numberOfMessages: 32, visibilityTimeout: 300 });
    if (batch.receivedMessageItems.length === 0) return texts;
    for (const m of batch.receivedMessageItems) {
      texts.push(m.messageText);
      await app.runtime.queue.deleteMessage(m.messageId, m.popReceipt);
    }
  }
}

const decode = (text: string) => JSON.parse(Buffer.from(text, 'base64').toString()) as PartMessage;

/** Replace the source blob once, right after the copier first reads it (for the pinning scenarios). */
function replaceSourceOnce(blob: BlockBlobClient, bytes: Buffer, when: 'after-head' | 'after-first-block') {
  let done = false;
  const replace = async () => {
    if (done) return;
    done = true;
    await blob.uploadData(bytes);
  };
  const realHead = BlobClient.prototype.getProperties;
  const realStage = BlockBlobClient.prototype.stageBlockFromURL;
  BlobClient.prototype.getProperties = async function (this: BlobClient, options) {
    const props = await realHead.call(this, options);
    if (when === 'after-head' && this.name === blob.name) await replace();
    return props;
  };
  BlockBlobClient.prototype.stageBlockFromURL = async function (this: BlockBlobClient, ...args) {
    const response = await realStage.apply(this, args);
    if (when === 'after-first-block') await replace();
    return response;
  };
  return () => {
    BlobClient.prototype.getProperties = realHead;
    BlockBlobClient.prototype.stageBlockFromURL = realStage;
  };
}

function cli(args: string[], env: Record<string, string>, killWhen?: () => Promise<boolean>) {
  return new Promise<{ code: number | null; output: string }>((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], {
      env: { PATH: process.env.PATH ?? '', HOME: process.env.HOME ?? '', ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let output = '';
    child.stdout.on('data', (d: Buffer) => {
      output += d.toString();
    });
    child.stderr.on('data', (d: Buffer) => {
      output += d.toString();
    });
    child.on('error', reject);
    child.on('exit', (code) => resolve({ code, output }));
    if (killWhen) {
      const poll = setInterval(async () => {
        if (await killWhen()) {
          clearInterval(poll);
          child.kill('SIGKILL');
        }
      }, 20);
      child.on('exit', () => clearInterval(poll));
    }
  });
}

const simple = (
  name: string,
  exportId: ExportId,
  prepare?: (ctx: Context, snap: SimulatedSnapshot) => Promise<void>,
  settings: Record<string, string> = {},
): Scenario => ({
  name,
  async run(ctx) {
    const app = await createApp(ctx.stack, { MDVM_EXPORTS: exportId, ...settings });
    const snap = await ctx.stack.simulator.publish(exportId, { recordsPerPart: 20 });
    await prepare?.(ctx, snap);
    await settle(app, ctx.stack);
    ctx.judge(app);
  },
});

const SCENARIOS: Scenario[] = [
  {
    name: 'all nine exports, one run',
    async run(ctx) {
      const app = await createApp(ctx.stack);
      await ctx.stack.simulator.publishAll({ recordsPerPart: 10 });
      await settle(app, ctx.stack, 1);
      ctx.judge(app);
    },
  },
  simple('Defender 429 with Retry-After', 'certificates', async (ctx) => {
    ctx.stack.simulator.injectFault('certificates', { kind: 'status', status: 429, retryAfterSeconds: 1 });
  }),
  simple('Defender 5xx burst', 'browser-extensions', async (ctx) => {
    ctx.stack.simulator.injectFault('browser-extensions', { kind: 'status', status: 503 }, 3);
  }),
  simple('Defender 500 then 502', 'hardware-firmware', async (ctx) => {
    ctx.stack.simulator.injectFault('hardware-firmware', { kind: 'status', status: 500 });
    ctx.stack.simulator.injectFault('hardware-firmware', { kind: 'status', status: 502 });
  }),
  simple(
    'Defender stalls past the client timeout',
    'security-baselines',
    async (ctx) => {
      ctx.stack.simulator.injectFault('security-baselines', { kind: 'stall', ms: 2_500 });
    },
    { MDVM_DEFENDER_TIMEOUT_MS: '1000' },
  ),
  simple('Defender response malformed', 'information-gathering', async (ctx) => {
    ctx.stack.simulator.injectFault('information-gathering', { kind: 'malformed' });
  }),
  simple('every SAS already expired on arrival', 'secure-configuration', async (ctx) => {
    ctx.stack.simulator.injectFault('secure-configuration', { kind: 'expired-sas' });
  }),
  simple('some SAS expired on arrival', 'software-inventory', async (ctx) => {
    ctx.stack.simulator.injectFault('software-inventory', { kind: 'expired-sas', parts: 2 });
  }),
  {
    name: 'source blob gone (404): failed, visible, no manifest',
    async run(ctx) {
      const app = await createApp(ctx.stack, { MDVM_EXPORTS: 'certificates' });
      await ctx.stack.simulator.publish('certificates', { recordsPerPart: 5 });
      ctx.stack.simulator.injectFault('certificates', { kind: 'missing-blob' });
      await settle(app, ctx.stack, 1);
      const [row] = await tableRows(app.runtime.storage.snapshotsTable);
      ctx.expect(row?.status === 'failed', 'the snapshot is failed, not complete');
      ctx.judge(app);
    },
  },
  {
    name: 'every message delivered three times',
    async run(ctx) {
      const app = await createApp(ctx.stack, { MDVM_EXPORTS: 'software-vulnerabilities' }, { workers: 16 });
      await ctx.stack.simulator.publish('software-vulnerabilities', { recordsPerPart: 20 });
      ctx.stack.simulator.resetRateLimits();
      await app.runner.tick();
      await duplicateQueuedMessages(app, 3);
      await app.runner.drain();
      ctx.judge(app);
    },
  },
  {
    name: 'messages delivered in reverse order, twice',
    async run(ctx) {
      const app = await createApp(ctx.stack, { MDVM_EXPORTS: 'software-inventory-noncpe' });
      await ctx.stack.simulator.publish('software-inventory-noncpe', { recordsPerPart: 20 });
      ctx.stack.simulator.resetRateLimits();
      await app.runner.tick();
      const texts = (await takeAll(app)).reverse();
      for (const text of [...texts, ...texts]) await app.runtime.queue.sendMessage(text);
      await app.runner.drain();
      ctx.judge(app);
    },
  },
  {
    name: 'crash mid-copy (half a block staged), redelivered',
    async run(ctx) {
      let crashed = false;
      const app = await createApp(
        ctx.stack,
        {
          MDVM_EXPORTS: 'software-inventory',
          MDVM_COPY_SINGLE_SHOT_MAX_MIB: '0.0625',
          MDVM_COPY_BLOCK_SIZE_MIB: '0.0625',
        },
        {
          wrapCopier: (real) => ({
            copy: async (request) => {
              if (!crashed) {
                crashed = true;
                await app.runtime.landing
                  .getBlockBlobClient(request.landingPath)
                  .stageBlockFromURL(Buffer.from('mdvm-block-000000').toString('base64'), request.sourceUrl, 0, 1024);
                throw new Error(`simulated crash while copying ${request.sourceUrl}`);
              }
              return real.copy(request);
            },
          }),
        },
      );
      await ctx.stack.simulator.publish('software-inventory', { recordsPerPart: 600 });
      await settle(app, ctx.stack, 1);
      ctx.expect(crashed, 'the crash happened');
      ctx.judge(app);
    },
  },
  {
    name: 'a part fails transiently five times: poison, then requeue',
    async run(ctx) {
      let healthy = false;
      let target = '';
      const app = await createApp(
        ctx.stack,
        { MDVM_EXPORTS: 'browser-extensions' },
        {
          wrapCopier: (real) => ({
            copy: async (request) => {
              target ||= request.landingPath;
              if (!healthy && request.landingPath === target) {
                throw new MdvmError('transient', `503 ServerBusy for ${request.sourceUrl}`);
              }
              return real.copy(request);
            },
          }),
        },
      );
      await ctx.stack.simulator.publish('browser-extensions', { recordsPerPart: 5 });
      await settle(app, ctx.stack, 1);
      healthy = true;
      const report = await requeuePoisoned(app.runtime);
      ctx.captured(JSON.stringify(report));
      await app.runner.drain();
      ctx.expect(report.moved > 0, 'requeue moved the parked message back');
      ctx.judge(app);
    },
  },
  {
    name: '64 workers on 400 parts (ETag races on the same rows)',
    async run(ctx) {
      const app = await createApp(ctx.stack, { MDVM_EXPORTS: 'software-vulnerabilities' }, { workers: 64 });
      await ctx.stack.simulator.publish('software-vulnerabilities', {
        groups: Array.from({ length: 10 }, (_, i) => i),
        partsPerGroup: 39,
        recordsPerPart: 1,
      });
      ctx.stack.simulator.resetRateLimits();
      await app.runner.tick();
      await duplicateQueuedMessages(app, 2);
      await app.runner.drain();
      ctx.judge(app);
    },
  },
  {
    name: 'a newer snapshot arrives while an older one copies',
    async run(ctx) {
      const app = await createApp(ctx.stack, { MDVM_EXPORTS: 'hardware-firmware' });
      await ctx.stack.simulator.publish('hardware-firmware', {
        generatedTime: '2026-11-10T00:01:00Z',
        recordsPerPart: 5,
      });
      ctx.stack.simulator.injectFault('hardware-firmware', { kind: 'expired-sas', parts: 3 });
      await settle(app, ctx.stack, 1);
      await ctx.stack.simulator.publish('hardware-firmware', {
        generatedTime: '2026-11-10T06:01:00Z',
        recordsPerPart: 5,
      });
      await settle(app, ctx.stack, 1);
      const rows = await tableRows(app.runtime.storage.snapshotsTable);
      ctx.expect(
        rows.some((r) => r.status === 'superseded'),
        'the older snapshot is superseded',
      );
      ctx.judge(app);
    },
  },
  ...(
    [
      [
        'forged message: another host',
        (m: PartMessage) => ({ ...m, sourceUrl: m.sourceUrl.replace(/^http:\/\/[^/]+/, 'https://exfil.example.com') }),
      ],
      [
        'forged message: unknown part',
        (m: PartMessage) => ({
          ...m,
          part: m.part.replace('c000', 'c099'),
          sourceUrl: m.sourceUrl.replace('c000', 'c099'),
        }),
      ],
      ['forged message: part and URL disagree', (m: PartMessage) => ({ ...m, part: m.part.replace('c000', 'c009') })],
      [
        'forged message: generatedTime respelled',
        (m: PartMessage) => ({ ...m, generatedTime: m.generatedTime.replace(/Z$/, '.000Z') }),
      ],
      ['forged message: wrong schema version', (m: PartMessage) => ({ ...m, v: 2 })],
    ] as const
  ).map(
    ([name, forge]): Scenario => ({
      name,
      async run(ctx) {
        const app = await createApp(ctx.stack, { MDVM_EXPORTS: 'certificates' });
        await ctx.stack.simulator.publish('certificates', { recordsPerPart: 5 });
        ctx.stack.simulator.resetRateLimits();
        await app.runner.tick();
        const texts = await takeAll(app);
        const sample = texts.map(decode).find((m) => m.part.includes('c000'));
        for (const text of texts) await app.runtime.queue.sendMessage(text);
        // Sent as raw JSON: a forged message does not go through our encoder's checks.
        if (sample) await app.runtime.queue.sendMessage(Buffer.from(JSON.stringify(forge(sample))).toString('base64'));
        await app.runner.drain();
        const letters = await app.runtime.poisonQueue.peekMessages({ numberOfMessages: 32 });
        ctx.expect(letters.peekedMessageItems.length === 1, 'the forged message is dead-lettered');
        ctx.judge(app);
      },
    }),
  ),
  {
    name: "forged message: another account's blob under the recorded part's path",
    async run(ctx) {
      const app = await createApp(ctx.stack, { MDVM_EXPORTS: 'information-gathering' });
      const snap = await ctx.stack.simulator.publish('information-gathering', { recordsPerPart: 5 });
      ctx.stack.simulator.resetRateLimits();
      await app.runner.tick();
      const texts = await takeAll(app);
      const sample = decode(texts[0] ?? '');
      const target = snap.parts.find((p) => p.relativePath === sample.part);
      const attacker = BlobServiceClient.fromConnectionString(
        ctx.stack.azurite.customer.connectionString,
      ).getContainerClient(snap.container);
      await attacker.createIfNotExists();
      const planted = attacker.getBlockBlobClient(target?.blobName ?? 'x');
      await planted.uploadData(Buffer.from('attacker bytes'));
      const url = await planted.generateSasUrl({
        permissions: BlobSASPermissions.parse('r'),
        expiresOn: new Date(Date.now() + 3_600_000),
      });
      ctx.captured(url);
      await app.runtime.queue.sendMessage(encodeMessage({ ...sample, sourceUrl: url }));
      await app.runner.drain();
      for (const text of texts) await app.runtime.queue.sendMessage(text);
      await app.runner.drain();
      ctx.judge(app);
    },
  },
  {
    name: 'a message that is not JSON, padded to blow up when escaped',
    async run(ctx) {
      const app = await createApp(ctx.stack, { MDVM_EXPORTS: 'certificates' });
      await ctx.stack.simulator.publish('certificates', { recordsPerPart: 5 });
      const padded = `{"sourceUrl":"https://x.blob.core.windows.net/c/a.json.gz?sig=${'S'.repeat(43)}","p":"${'\u0001'.repeat(44_000)}"}`;
      await app.runtime.queue.sendMessage(Buffer.from(padded).toString('base64'));
      await settle(app, ctx.stack, 1);
      const letters = await app.runtime.poisonQueue.peekMessages({ numberOfMessages: 32 });
      ctx.expect(letters.peekedMessageItems.length === 1, 'one bounded dead letter');
      ctx.judge(app);
    },
  },
  {
    name: 'landing container deleted mid-run, recreated by the operator',
    async run(ctx) {
      let landed = 0;
      const app: TestApp = await createApp(
        ctx.stack,
        { MDVM_EXPORTS: 'software-inventory-noncpe' },
        {
          workers: 1,
          wrapCopier: (real) => ({
            copy: async (request) => {
              if (landed === 3) await app.runtime.landing.deleteIfExists();
              const result = await real.copy(request);
              landed++;
              return result;
            },
          }),
        },
      );
      await ctx.stack.simulator.publish('software-inventory-noncpe', { recordsPerPart: 5 });
      await settle(app, ctx.stack, 1);
      await app.runtime.landing.createIfNotExists();
      landed = 100;
      await settle(app, ctx.stack, 3);
      ctx.judge(app);
    },
  },
  {
    name: 'Defender lists no files, then the files',
    async run(ctx) {
      const app = await createApp(ctx.stack, { MDVM_EXPORTS: 'certificates' });
      await ctx.stack.simulator.publish('certificates', { recordsPerPart: 5 });
      ctx.stack.simulator.injectFault('certificates', { kind: 'rewrite', rewrite: (b) => ({ ...b, exportFiles: [] }) });
      await settle(app, ctx.stack, 2);
      ctx.judge(app);
    },
  },
  {
    name: 'Defender lists one file, then all of them',
    async run(ctx) {
      const app = await createApp(ctx.stack, { MDVM_EXPORTS: 'browser-extensions' });
      await ctx.stack.simulator.publish('browser-extensions', { recordsPerPart: 5 });
      ctx.stack.simulator.injectFault('browser-extensions', {
        kind: 'rewrite',
        rewrite: (b) => ({ ...b, exportFiles: b.exportFiles.slice(0, 1) }),
      });
      await settle(app, ctx.stack, 3);
      ctx.judge(app);
    },
  },
  {
    name: 'derived data over two snapshots, every derive message delivered three times',
    async run(ctx) {
      const exportId = 'software-inventory';
      const app = await createApp(ctx.stack, {
        MDVM_EXPORTS: exportId,
        MDVM_CURATED_EXPORTS: exportId,
        MDVM_CHANGE_SET_EXPORTS: exportId,
        MDVM_COPY_MODE: 'stream',
        MDVM_COUNT_RECORDS: 'true',
      });
      const derive = app.runtime.storage.deriveQueue;
      for (let i = 0; i < 2; i++) {
        await ctx.stack.simulator.publish(exportId, { recordsPerPart: 15 + i });
        ctx.stack.simulator.resetRateLimits();
        await app.runner.tick();
        // Copies first: completion enqueues the derive messages; then every one of them is there three times.
        await app.runner.drain({ only: 'parts' });
        const texts: string[] = [];
        for (;;) {
          const batch = await derive.receiveMessages({ numberOfMessages: 32, visibilityTimeout: 300 });
          if (batch.receivedMessageItems.length === 0) break;
          for (const m of batch.receivedMessageItems) {
            texts.push(m.messageText);
            await derive.deleteMessage(m.messageId, m.popReceipt);
          }
        }
        ctx.expect(texts.length > 0, 'completion enqueued derive messages');
        for (const text of [...texts, ...texts, ...texts]) await derive.sendMessage(text);
        await app.runner.drain();
      }
      const rows = await tableRows(app.runtime.storage.snapshotsTable);
      const ids = rows.filter((r) => r.status === 'complete').map((r) => String(r.snapshotId));
      ctx.expect(ids.length === 2, 'both snapshots complete');
      for (const id of ids) {
        const names = await listBlobNames(app);
        ctx.expect(names.includes(curatedManifestPath(exportId, id)), `curated manifest of ${id}`);
        ctx.expect(names.includes(changesManifestPath(exportId, id)), `change set of ${id}`);
      }
      ctx.judge(app);
    },
  },
  {
    name: 'derived data when Defender lists one file, then all of them',
    async run(ctx) {
      const app = await createApp(ctx.stack, {
        MDVM_EXPORTS: 'hardware-firmware',
        MDVM_CURATED_EXPORTS: 'hardware-firmware',
        MDVM_CHANGE_SET_EXPORTS: 'hardware-firmware',
      });
      await ctx.stack.simulator.publish('hardware-firmware', { recordsPerPart: 5 });
      ctx.stack.simulator.injectFault('hardware-firmware', {
        kind: 'rewrite',
        rewrite: (b) => ({ ...b, exportFiles: b.exportFiles.slice(0, 1) }),
      });
      await settle(app, ctx.stack, 3);
      ctx.judge(app);
    },
  },
  {
    name: 'the same snapshot respelled half a second later',
    async run(ctx) {
      const app = await createApp(ctx.stack, { MDVM_EXPORTS: 'security-baselines' });
      await ctx.stack.simulator.publish('security-baselines', { recordsPerPart: 5 });
      await settle(app, ctx.stack, 1);
      ctx.stack.simulator.injectFault('security-baselines', {
        kind: 'rewrite',
        rewrite: (b) => ({ ...b, generatedTime: b.generatedTime.replace(/Z$/, '.500Z') }),
      });
      await settle(app, ctx.stack, 1);
      const rows = await tableRows(app.runtime.storage.snapshotsTable);
      ctx.expect(new Set(rows.map((r) => r.snapshotId)).size === rows.length, 'two instants, two snapshot ids');
      ctx.expect(rows.length === 2 && rows.every((r) => r.status === 'complete'), 'both snapshots complete');
      ctx.judge(app);
    },
  },
  ...(['block', 'stream'] as const).map(
    (path): Scenario => ({
      name: `the source is replaced during a ${path} copy`,
      async run(ctx) {
        const settings: Record<string, string> =
          path === 'block'
            ? { MDVM_COPY_SINGLE_SHOT_MAX_MIB: '0.0625', MDVM_COPY_BLOCK_SIZE_MIB: '0.0625' }
            : { MDVM_COPY_MODE: 'stream', MDVM_STREAM_BUFFER_MIB: '1' };
        const app = await createApp(ctx.stack, { MDVM_EXPORTS: 'secure-configuration', ...settings }, { workers: 1 });
        const snap = await ctx.stack.simulator.publish('secure-configuration', {
          groups: [0],
          partsPerGroup: 1,
          recordsPerPart: 4_000,
        });
        const part = snap.parts[0];
        const blob = ctx.stack.simulator.sourceContainer(snap).getBlockBlobClient(part?.blobName ?? '');
        const original = await blob.downloadToBuffer();
        const restore = replaceSourceOnce(
          blob,
          Buffer.from(original.map((b) => b ^ 0x5a)),
          path === 'block' ? 'after-first-block' : 'after-head',
        );
        try {
          await settle(app, ctx.stack, 1);
        } finally {
          restore();
        }
        ctx.judge(app);
      },
    }),
  ),
  {
    name: 'a lease holds _latest.json, then is released',
    async run(ctx) {
      const app = await createApp(ctx.stack, { MDVM_EXPORTS: 'secure-configuration' });
      await ctx.stack.simulator.publish('secure-configuration', {
        generatedTime: '2026-11-11T00:01:00Z',
        recordsPerPart: 5,
      });
      await settle(app, ctx.stack, 1);
      const lease = app.runtime.landing.getBlobClient(latestPath('secure-configuration')).getBlobLeaseClient();
      await lease.acquireLease(-1);
      await ctx.stack.simulator.publish('secure-configuration', {
        generatedTime: '2026-11-11T06:01:00Z',
        recordsPerPart: 5,
      });
      await settle(app, ctx.stack, 1);
      const held = (await tableRows(app.runtime.storage.snapshotsTable)).find(
        (r) => r.rowKey === '2026-11-11T06:01:00Z',
      );
      ctx.expect(held?.status !== 'complete', 'not complete while the pointer cannot move');
      await lease.releaseLease();
      await settle(app, ctx.stack, 1);
      ctx.judge(app);
    },
  },
  {
    name: 'a generatedTime in the year 9999',
    async run(ctx) {
      const app = await createApp(ctx.stack, { MDVM_EXPORTS: 'hardware-firmware' });
      await ctx.stack.simulator.publish('hardware-firmware', { recordsPerPart: 5 });
      ctx.stack.simulator.injectFault('hardware-firmware', {
        kind: 'rewrite',
        rewrite: (b) => ({ ...b, generatedTime: '9999-12-31T23:59:00Z' }),
      });
      await settle(app, ctx.stack, 2);
      const rows = await tableRows(app.runtime.storage.snapshotsTable);
      ctx.expect(!rows.some((r) => String(r.rowKey).startsWith('9999')), 'nothing recorded for the future');
      ctx.judge(app);
    },
  },
  {
    name: 'files of another export, beyond Azure name limits, and in another date folder',
    async run(ctx) {
      const app = await createApp(ctx.stack, { MDVM_EXPORTS: 'software-inventory' });
      const snap = await ctx.stack.simulator.publish('software-inventory', { recordsPerPart: 5 });
      const org = snap.parts[0]?.relativePath.split('/')[0] ?? '';
      const otherExport = `${snap.prefix.replace('/SoftwareInventory/', '/ScaExport/')}/${org}/_RbacGroupId=0/part-00000-x.c000.json.gz`;
      const longPath = `${snap.prefix}/${org}/_RbacGroupId=0/${'a'.repeat(190)}/${'b'.repeat(190)}/${'c'.repeat(190)}/part-00000-y.c000.json.gz`;
      ctx.stack.simulator.injectFault('software-inventory', {
        kind: 'rewrite',
        rewrite: (b, sign) => ({ ...b, exportFiles: [...b.exportFiles, sign(otherExport), sign(longPath)] }),
      });
      await settle(app, ctx.stack, 1);
      const [row] = await tableRows(app.runtime.storage.snapshotsTable);
      ctx.expect(row?.status === 'failed' && row.partsRefused === 2, 'refused files keep the snapshot from completing');
      ctx.judge(app);
    },
  },
  {
    name: 'Defender stalls longer than run --timeout-s',
    async run(ctx) {
      const app = await createApp(ctx.stack, { MDVM_EXPORTS: 'information-gathering' });
      await ctx.stack.simulator.publish('information-gathering', { recordsPerPart: 5 });
      ctx.stack.simulator.resetRateLimits();
      ctx.stack.simulator.injectFault('information-gathering', { kind: 'stall', ms: 20_000 });
      const report = await runIngestion(app.runtime, {
        exports: ['information-gathering'],
        workers: 2,
        timeoutInMs: 1_000,
      });
      ctx.captured(JSON.stringify(report.rows));
      ctx.expect(!report.ok && report.seconds < 10, 'the run stops at its timeout');
      await settle(app, ctx.stack, 1);
      ctx.judge(app);
    },
  },
  simple(
    'a truncated gzip part in stream mode with counting: refused every time, never completed',
    'browser-extensions',
    async (ctx, snap) => {
      const part = snap.parts[1];
      if (!part) return;
      const blob = ctx.stack.simulator.sourceContainer(snap).getBlockBlobClient(part.blobName);
      const bytes = await blob.downloadToBuffer();
      await blob.uploadData(bytes.subarray(0, bytes.length - 9));
    },
    { MDVM_COPY_MODE: 'stream', MDVM_COUNT_RECORDS: 'true' },
  ),
  simple('stream mode with record counts', 'software-vulnerabilities', undefined, {
    MDVM_COPY_MODE: 'stream',
    MDVM_COUNT_RECORDS: 'true',
  }),
  simple('block path for every part', 'certificates', undefined, {
    MDVM_COPY_SINGLE_SHOT_MAX_MIB: '0.0625',
    MDVM_COPY_BLOCK_SIZE_MIB: '0.0625',
  }),
  {
    name: 'kill -9 of a real run mid-copy, then a second run',
    async run(ctx) {
      const app = await createApp(ctx.stack, { MDVM_EXPORTS: 'security-baselines' });
      await ctx.stack.simulator.publish('security-baselines', {
        groups: [0, 12, 31],
        partsPerGroup: 3,
        recordsPerPart: 400,
      });
      ctx.stack.simulator.resetRateLimits();
      const first = await cli(['run', '--workers', '2'], { ...app.env, MDVM_COPY_MODE: 'stream' }, async () => {
        const rows = await tableRows(app.runtime.storage.partsTable);
        return rows.filter((r) => r.status === 'landed').length >= 2;
      });
      ctx.captured(first.output);
      ctx.stack.simulator.resetRateLimits();
      const second = await cli(['run', '--timeout-s', '75'], app.env);
      ctx.captured(second.output);
      ctx.expect(first.code === null && second.code === 0, 'killed, then resumed to completion');
      ctx.judge(app);
    },
  },
];

/** Judge one app's end state against the source of truth (the simulator's published snapshots). */
async function judgeApp(stack: Stack, app: TestApp, secrets: Set<string>, captured: string[]): Promise<string[]> {
  const found: string[] = [];
  const landing = app.runtime.landing;
  const snapshots = await tableRows(app.runtime.storage.snapshotsTable);
  const parts = await tableRows(app.runtime.storage.partsTable);
  const blobs = new Map<string, { bytes: number; metadata: Record<string, string> | undefined }>();
  if (await landing.exists()) {
    for await (const b of landing.listBlobsFlat({ includeMetadata: true })) {
      blobs.set(b.name, { bytes: b.properties.contentLength ?? 0, metadata: b.metadata });
    }
  }
  const text: string[] = [...captured];
  text.push(...app.logs.map((l) => l.line), ...app.events.map((e) => JSON.stringify(e)));
  text.push(...snapshots.map((r) => JSON.stringify(r)), ...parts.map((r) => JSON.stringify(r)));
  for (const [name, b] of blobs) text.push(name, JSON.stringify(b.metadata ?? {}));

  const download = async (name: string) => landing.getBlobClient(name).downloadToBuffer();
  const rowsBySnapshot = new Map<string, Record<string, unknown>[]>();
  for (const p of parts)
    rowsBySnapshot.set(String(p.snapshotId), [...(rowsBySnapshot.get(String(p.snapshotId)) ?? []), p]);

  // Every landed row: its blob is there, byte-exact (lost otherwise).
  for (const p of parts.filter((r) => r.status === 'landed')) {
    totals.parts++;
    const blob = blobs.get(String(p.landingPath));
    if (!blob || blob.bytes !== p.bytes) {
      found.push(`lost: ${p.landingPath} is landed in the table but ${blob ? `has ${blob.bytes} bytes` : 'missing'}`);
      totals.lost++;
      continue;
    }
    if (p.md5 && md5(await download(String(p.landingPath))) !== p.md5) {
      found.push(`lost: ${p.landingPath} does not have its recorded MD5`);
      totals.lost++;
    }
  }
  // Every blob in a snapshot folder is a recorded part, its manifest, or nothing we wrote (duplicated otherwise).
  const recorded = new Set(parts.map((p) => String(p.landingPath)));
  for (const name of blobs.keys()) {
    if (name.endsWith('/_latest.json') || name.endsWith('/_manifest.json')) continue;
    // Derived data is judged on its own below.
    if (name.startsWith(`${CURATED_PREFIX}/`) || name.startsWith(`${CHANGES_PREFIX}/`)) continue;
    if (!recorded.has(name)) {
      found.push(`duplicated: ${name} is in the landing container but no part row records it`);
      totals.duplicated++;
    }
  }
  // Manifests: exactly the complete snapshots have one, and it tells the truth.
  for (const s of snapshots) {
    const folder = `${s.partitionKey}/snapshot=${s.snapshotId}`;
    const path = `${folder}/_manifest.json`;
    const rows = rowsBySnapshot.get(String(s.snapshotId)) ?? [];
    const landedRows = rows.filter((r) => r.status === 'landed');
    if (s.status !== 'complete') {
      if (blobs.has(path) && landedRows.length !== rows.length) {
        found.push(`manifest wrong: ${path} exists but ${rows.length - landedRows.length} part(s) are not landed`);
        totals.manifestsWrong++;
      }
      continue;
    }
    if (!blobs.has(path)) {
      found.push(`manifest wrong: ${folder} is complete without a _manifest.json`);
      totals.manifestsWrong++;
      continue;
    }
    const body = (await download(path)).toString();
    text.push(body);
    const parsed = manifestSchema.safeParse(parseJson(body));
    if (!parsed.success) {
      found.push(`manifest wrong: ${path} breaks its contract`);
      totals.manifestsWrong++;
      continue;
    }
    const manifest: SnapshotManifest = parsed.data;
    const listed = manifest.parts.map((p) => p.path);
    if (new Set(listed).size !== listed.length) {
      found.push(`duplicated: ${path} lists a part twice`);
      totals.duplicated++;
    }
    const wrong =
      listed.length !== landedRows.length ||
      rows.length !== landedRows.length ||
      manifest.parts.some((p) => {
        const blob = blobs.get(p.path);
        return !blob || blob.bytes !== p.bytes;
      });
    if (wrong) {
      found.push(`manifest wrong: ${path} lists ${listed.length} parts, ${landedRows.length} landed of ${rows.length}`);
      totals.manifestsWrong++;
    }
    for (const p of manifest.parts) {
      if (p.md5 && blobs.has(p.path) && md5(await download(p.path)) !== p.md5) {
        found.push(`manifest wrong: ${p.path} does not match the MD5 its manifest states`);
        totals.manifestsWrong++;
      }
    }
    // The source is the truth: every file the simulator published for this snapshot landed byte-exact.
    const truth = stack.simulator.published(String(s.partitionKey) as ExportId, String(s.rowKey));
    for (const part of truth?.parts ?? []) {
      const entry = manifest.parts.find((p) => p.part === part.relativePath);
      const bytes = entry && blobs.has(entry.path) ? await download(entry.path) : undefined;
      if (!bytes || md5(bytes) !== (await sourceMd5(stack, truth, part.blobName))) {
        found.push(`lost: ${part.relativePath} of complete ${folder} is not in its manifest byte-exact`);
        totals.lost++;
      }
    }
  }
  // Derived manifests tell the truth about the raw snapshot they name, and what they list is there.
  for (const [name] of blobs) {
    if (!name.endsWith('/_manifest.json')) continue;
    const curated = name.startsWith(`${CURATED_PREFIX}/`);
    if (!curated && !name.startsWith(`${CHANGES_PREFIX}/`)) continue;
    const body = (await download(name)).toString();
    const parsed = curated
      ? curatedManifestSchema.safeParse(parseJson(body))
      : changeSetManifestSchema.safeParse(parseJson(body));
    if (!parsed.success) {
      found.push(`manifest wrong: ${name} breaks its contract`);
      totals.manifestsWrong++;
      continue;
    }
    const derived = parsed.data;
    const raw = blobs.has(derived.source)
      ? manifestSchema.safeParse(parseJson((await download(derived.source)).toString()))
      : undefined;
    if (!raw?.success || derived.sourceDigest !== sourceDigest(raw.data.parts)) {
      found.push(`manifest wrong: ${name} is not made from the raw manifest now at ${derived.source}`);
      totals.manifestsWrong++;
      continue;
    }
    if (derived.kind === 'curated') {
      const wrong =
        derived.parts.map((p) => p.source).join('\n') !== raw.data.parts.map((p) => p.path).join('\n') ||
        derived.parts.some((p, i) => {
          const blob = blobs.get(p.path);
          const records = raw.data.parts[i]?.records;
          return !blob || blob.bytes !== p.bytes || (records !== null && records !== undefined && records !== p.rows);
        });
      if (wrong) {
        found.push(`manifest wrong: ${name} does not list one Parquet file per raw part with its rows`);
        totals.manifestsWrong++;
      }
    } else {
      const data = blobs.has(derived.path) ? await download(derived.path) : undefined;
      if (!data || data.length !== derived.bytes || md5(data) !== derived.md5) {
        found.push(`manifest wrong: ${name} names ${derived.path}, which is not there as listed`);
        totals.manifestsWrong++;
      } else if (
        gunzipSync(data)
          .toString()
          .split('\n')
          .filter((l) => l !== '').length !== derived.totals.rows
      ) {
        found.push(`manifest wrong: ${name} counts ${derived.totals.rows} changes, its file has others`);
        totals.manifestsWrong++;
      }
    }
  }
  // Derive dead letters are ours too: scanned for secrets.
  const derivePoison = await app.runtime.storage.derivePoisonQueue
    .peekMessages({ numberOfMessages: 32 })
    .catch(() => undefined);
  for (const m of derivePoison?.peekedMessageItems ?? []) text.push(Buffer.from(m.messageText, 'base64').toString());
  // _latest.json never behind the newest complete snapshot.
  const exportsSeen = new Set(snapshots.map((s) => String(s.partitionKey)));
  for (const exportId of exportsSeen) {
    const complete = snapshots
      .filter((s) => s.partitionKey === exportId && s.status === 'complete')
      .map((s) => String(s.rowKey))
      .sort(compareGeneratedTime)
      .at(-1);
    if (!complete) continue;
    const name = latestPath(exportId);
    const pointer = blobs.has(name) ? latestSchema.safeParse(parseJson((await download(name)).toString())) : undefined;
    if (!pointer?.success || compareGeneratedTime(pointer.data.generatedTime, complete) < 0) {
      found.push(`manifest wrong: ${name} is behind ${complete}`);
      totals.manifestsWrong++;
    }
  }
  // Dead letters are ours and must be clean; part messages parked by the host carry their SAS by design.
  const poison = await app.runtime.poisonQueue.peekMessages({ numberOfMessages: 32 }).catch(() => undefined);
  for (const m of poison?.peekedMessageItems ?? []) {
    const decoded = Buffer.from(m.messageText, 'base64').toString();
    if (/"deadLetteredAt"/.test(decoded)) text.push(decoded);
  }
  const all = text.join('\n');
  for (const secret of secrets) {
    if (secret.length >= 16 && all.includes(secret)) {
      found.push(`secret leaked: ${secret.slice(0, 6)}…`);
      totals.secretsLeaked++;
    }
  }
  return found;
}

async function sourceMd5(stack: Stack, snap: SimulatedSnapshot | undefined, blobName: string): Promise<string> {
  if (!snap) return '';
  return md5(await stack.simulator.sourceContainer(snap).getBlockBlobClient(blobName).downloadToBuffer());
}

async function main(): Promise<number> {
  const only = process.argv[2];
  // What Application Insights would receive goes into each scenario's secret scan too.
  const openTelemetry = captureOpenTelemetry();
  const stack = await startStack();
  // Every publish gets its own generatedTime unless a scenario names one: scenarios never share a snapshot.
  const publish = stack.simulator.publish.bind(stack.simulator);
  let hour = 0;
  stack.simulator.publish = (exportId, options = {}) =>
    publish(exportId, {
      generatedTime: new Date(Date.UTC(2026, 9, 1, 0, 1) + hour++ * 3_600_000).toISOString(),
      ...options,
    });
  const started = Date.now();
  try {
    for (const scenario of SCENARIOS) {
      if (only && !scenario.name.includes(only)) continue;
      const apps: TestApp[] = [];
      const captured: string[] = [];
      const failed: string[] = [];
      const t0 = Date.now();
      openTelemetry.reset();
      try {
        await scenario.run({
          stack,
          judge: (app) => apps.push(app),
          captured: (text) => captured.push(text),
          expect: (ok, what) => {
            if (!ok) failed.push(`expected: ${what}`);
          },
        });
      } catch (error) {
        captured.push(String((error as Error).stack ?? error));
        failed.push(`threw: ${(error as Error).message}`);
      }
      captured.push(await openTelemetry.everything());
      const secrets = new Set([...stack.simulator.issuedSecrets, stack.azurite.source.key, stack.azurite.customer.key]);
      for (const app of apps) failed.push(...(await judgeApp(stack, app, secrets, captured)));
      totals.scenarios++;
      const mark = failed.length === 0 ? 'ok  ' : 'FAIL';
      console.log(`${mark} ${scenario.name} (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
      for (const f of failed) console.log(`       ${f}`);
      problems.push(...failed.map((f) => `${scenario.name}: ${f}`));
    }
  } finally {
    await stack.stop();
  }
  console.log(`chaos took ${((Date.now() - started) / 1000).toFixed(0)} s`);
  console.log(
    `chaos: ${totals.scenarios} scenarios, ${totals.parts} parts, ${totals.lost} lost, ${totals.duplicated} duplicated, ${totals.manifestsWrong} manifests wrong, ${totals.secretsLeaked} secrets leaked`,
  );
  return problems.length === 0 ? 0 : 1;
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (error: unknown) => {
    console.error(error);
    console.log(
      'chaos: 0 scenarios, 0 parts, 0 lost, 0 duplicated, 0 manifests wrong, 0 secrets leaked (suite crashed)',
    );
    process.exitCode = 1;
  },
);
