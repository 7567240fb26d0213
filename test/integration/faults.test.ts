import { setTimeout as sleep } from 'node:timers/promises';
import { BlobClient, BlobSASPermissions, BlobServiceClient, BlockBlobClient } from '@azure/storage-blob';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import type { CopyRequest } from '../../src/core/copier.js';
import { MdvmError } from '../../src/core/errors.js';
import { landPart, MAX_DEQUEUE_COUNT } from '../../src/core/landPart.js';
import { ConcurrentUpdateError } from '../../src/core/manifestStore.js';
import type { DeadLetter, PartMessage } from '../../src/core/messages.js';
import { encodeMessage } from '../../src/core/messages.js';
import { requestSnapshot } from '../../src/core/requestSnapshot.js';
import { Telemetry } from '../../src/core/telemetry.js';
import { curatedManifestPath } from '../../src/derive/contracts.js';
import { requeuePoisoned } from '../../src/ops/requeue.js';
import {
  createApp,
  listBlobNames,
  md5,
  queueTexts,
  replacing,
  type Stack,
  startStack,
  type TestApp,
  tableRows,
  watchingTick,
} from '../helpers/stack.js';

let stack: Stack;
beforeAll(async () => {
  stack = await startStack();
});
afterAll(async () => {
  await stack?.stop();
});

const quietTelemetry = () => new Telemetry({ info() {}, warn() {}, error() {} });

async function state(app: TestApp) {
  return {
    snapshots: await tableRows(app.runtime.storage.snapshotsTable),
    parts: await tableRows(app.runtime.storage.partsTable),
    blobs: await listBlobNames(app),
  };
}

async function takeQueuedMessages(app: TestApp): Promise<PartMessage[]> {
  const out: PartMessage[] = [];
  for (;;) {
    const batch = await app.runtime.queue.receiveMessages({ numberOfMessages: 32, visibilityTimeout: 300 });
    if (batch.receivedMessageItems.length === 0) return out;
    for (const m of batch.receivedMessageItems) {
      out.push(JSON.parse(Buffer.from(m.messageText, 'base64').toString()) as PartMessage);
      await app.runtime.queue.deleteMessage(m.messageId, m.popReceipt);
    }
  }
}

/**
 * An information-gathering snapshot ticked, its messages taken off the queue: the first one, the part it names and
 * the app, for a test that sends its own variant of that message.
 */
async function tickAndTakeOneMessage(generatedTime: string) {
  const app = await createApp(stack, { MDVM_EXPORTS: 'information-gathering' });
  const snap = await stack.simulator.publish('information-gathering', { generatedTime, recordsPerPart: 5 });
  await app.runner.tick();
  const [genuine] = await takeQueuedMessages(app);
  if (!genuine) throw new Error('no message');
  const target = snap.parts.find((p) => p.relativePath === genuine.part);
  if (!target) throw new Error('unknown part');
  return { app, snap, genuine, target };
}

/** Another tick, which must succeed, then every message handled: the tables and blobs after it. */
async function tickCleanlyAndDrain(app: TestApp) {
  stack.simulator.resetRateLimits();
  const [report] = await app.runner.tick();
  expect(report?.error).toBeUndefined();
  await app.runner.drain();
  return state(app);
}

/** 250 parts in one snapshot (past two transactions of 100), with the API's rate limits reset for the tick. */
async function publishTwoAndAHalfHundredParts(generatedTime: string) {
  const snap = await stack.simulator.publish('software-inventory-noncpe', {
    generatedTime,
    groups: [0, 1, 2, 3, 4],
    partsPerGroup: 49,
    recordsPerPart: 1,
  });
  expect(snap.parts).toHaveLength(250);
  stack.simulator.resetRateLimits();
  return snap;
}

describe('bad input and failures', () => {
  it('dead-letters malformed and forged messages with a reason and changes nothing else', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'software-inventory-noncpe' });
    await stack.simulator.publish('software-inventory-noncpe', {
      generatedTime: '2026-11-19T00:01:00Z',
      recordsPerPart: 5,
    });
    await app.runner.tick();
    const [sample] = await takeQueuedMessages(app);
    if (!sample) throw new Error('no message');
    await app.runtime.queue.sendMessage(encodeMessage(sample));
    await app.runner.drain();
    // Re-enqueue everything the first tick wanted, then take a baseline.
    const baseline = await state(app);

    const b64 = (text: string) => Buffer.from(text).toString('base64');
    const forgedHost = {
      ...sample,
      sourceUrl: sample.sourceUrl.replace(/^http:\/\/127\.0\.0\.1:\d+/, 'https://exfil.example.com'),
    };
    const unknownPart = {
      ...sample,
      part: sample.part.replace('_RbacGroupId=0', '_RbacGroupId=777'),
      sourceUrl: sample.sourceUrl.replace(/_RbacGroupId(=|%3D)0\//, '_RbacGroupId$1777/'),
    };
    const mismatched = { ...sample, part: sample.part.replace('c000', 'c009') };
    // The same instant spelled another way: it must not dodge the table key (and the superseded check).
    const respelled = { ...sample, generatedTime: sample.generatedTime.replace(/Z$/, '.000Z') };
    const sent = [
      b64('this is not json'),
      b64(JSON.stringify({ v: 2, hello: 'world' })),
      encodeMessage(forgedHost as PartMessage),
      encodeMessage(unknownPart as PartMessage),
      encodeMessage(mismatched as PartMessage),
      encodeMessage(respelled as PartMessage),
    ];
    for (const text of sent) await app.runtime.queue.sendMessage(text);
    await app.runner.drain();

    const letters = (await queueTexts(app, 'poison')).map(
      (t) => JSON.parse(Buffer.from(t, 'base64').toString()) as DeadLetter,
    );
    expect(letters).toHaveLength(sent.length);
    expect(letters.map((l) => l.reason)).toEqual(
      expect.arrayContaining([
        expect.stringMatching(/not JSON/),
        expect.stringMatching(/v1 part schema.*v/),
        expect.stringMatching(/host exfil\.example\.com is not in MDVM_SOURCE_HOST_ALLOWLIST/),
        expect.stringMatching(/no part row/),
        expect.stringMatching(/does not match the source URL/),
        expect.stringMatching(/generatedTime '2026-11-19T00:01:00\.000Z' is not canonical/),
      ]),
    );
    for (const letter of letters) {
      expect(letter.original).not.toMatch(/sig=[^<]/);
      expect(letter.deadLetteredAt).toMatch(/Z$/);
    }
    expect(await state(app)).toEqual(baseline);
    expect((await app.runtime.queue.getProperties()).approximateMessagesCount).toBe(0);
  });

  it('dead-letters a message that names another account as the source of a recorded part (binding to the tick)', async () => {
    const { app, snap, genuine, target } = await tickAndTakeOneMessage('2026-11-19T02:01:00Z');
    // The attacker's copy of the same part path, in another account the host allowlist also admits.
    const attacker = BlobServiceClient.fromConnectionString(stack.azurite.customer.connectionString).getContainerClient(
      snap.container,
    );
    await attacker.createIfNotExists();
    const planted = attacker.getBlockBlobClient(target.blobName);
    await planted.uploadData(Buffer.from('attacker bytes'));
    const plantedUrl = await planted.generateSasUrl({
      permissions: BlobSASPermissions.parse('r'),
      expiresOn: new Date(Date.now() + 3_600_000),
    });
    await app.runtime.queue.sendMessage(encodeMessage({ ...genuine, sourceUrl: plantedUrl }));
    await app.runner.drain();

    const letters = (await queueTexts(app, 'poison')).map(
      (t) => JSON.parse(Buffer.from(t, 'base64').toString()) as DeadLetter,
    );
    expect(letters).toHaveLength(1);
    expect(letters[0]?.reason).toMatch(/is not the source recorded for information-gathering/);
    expect(letters[0]?.original).not.toMatch(/sig=[^<]/);
    const row = (await state(app)).parts.find((p) => p.path === genuine.part);
    expect(row?.status).not.toBe('landed');

    // The genuine message still lands the genuine bytes.
    await app.runtime.queue.sendMessage(encodeMessage(genuine));
    await app.runner.drain();
    const landed = await app.runtime.landing
      .getBlockBlobClient(`information-gathering/snapshot=2026-11-19T0201Z/${genuine.part}`)
      .downloadToBuffer();
    expect(md5(landed)).toBe(target.md5);
  });

  it('dead-letters a delivery whose part row was edited to land elsewhere, and leaves that blob alone', async () => {
    const { app, genuine } = await tickAndTakeOneMessage('2026-11-19T04:01:00Z');
    const pointer = app.runtime.landing.getBlockBlobClient('information-gathering/_latest.json');
    await pointer.upload('{"v":1}', 7);
    const row = await app.runtime.store.getPart('information-gathering', genuine.snapshot, genuine.part);
    if (!row) throw new Error('no row');
    await app.runtime.store.updatePart(row, { landingPath: 'information-gathering/_latest.json' });

    await app.runtime.queue.sendMessage(encodeMessage(genuine));
    await app.runner.drain();
    const letters = (await queueTexts(app, 'poison')).map(
      (t) => JSON.parse(Buffer.from(t, 'base64').toString()) as DeadLetter,
    );
    expect(letters).toHaveLength(1);
    expect(letters[0]?.reason).toMatch(/landingPath \(information-gathering\/_latest\.json\) is not where/);
    expect((await pointer.downloadToBuffer()).toString()).toBe('{"v":1}');
    expect(
      (await app.runtime.store.getPart('information-gathering', genuine.snapshot, genuine.part))?.value.status,
    ).toBe('queued');
  });

  it('requeue refuses a poisoned message the copier would dead-letter: another source for the part, a generatedTime not canonical', async () => {
    const { app, snap, genuine, target } = await tickAndTakeOneMessage('2026-11-19T03:01:00Z');
    const other = BlobServiceClient.fromConnectionString(stack.azurite.customer.connectionString)
      .getContainerClient(snap.container)
      .getBlockBlobClient(target.blobName);
    const otherUrl = `${other.url}?se=2099-01-01T00%3A00%3A00Z&sig=FAKEtestSignatureNotARealKey`;
    for (const forged of [
      { ...genuine, sourceUrl: otherUrl },
      { ...genuine, generatedTime: '2026-11-19T03:01:00.000Z' },
    ]) {
      await app.runtime.poisonQueue.sendMessage(encodeMessage(forged));
    }

    const report = await requeuePoisoned(app.runtime);
    expect(report).toMatchObject({ moved: 0, refused: 2 });
    expect(report.entries.map((e) => e.reason)).toEqual([
      expect.stringMatching(/is not the source recorded for information-gathering/),
      expect.stringMatching(/generatedTime '2026-11-19T03:01:00.000Z' is not canonical/),
    ]);
    expect(JSON.stringify(report)).not.toMatch(/sig=(?!<redacted>)/);
    expect((await app.runtime.poisonQueue.getProperties()).approximateMessagesCount).toBe(2);
    expect((await app.runtime.queue.getProperties()).approximateMessagesCount).toBe(0);
  });

  it('a landing container deleted mid-run: no part is written off as a lost source, no manifest lists a missing blob, and the snapshot lands once it is back', async () => {
    let landedBeforeDeletion = 0;
    let deleted = false;
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'hardware-firmware' },
      {
        workers: 1,
        wrapCopier: (real) => ({
          copy: async (request) => {
            if (!deleted && landedBeforeDeletion === 3) {
              deleted = true;
              await app.runtime.landing.delete();
            }
            const result = await real.copy(request);
            landedBeforeDeletion++;
            return result;
          },
        }),
      },
    );
    const snap = await stack.simulator.publish('hardware-firmware', {
      generatedTime: '2026-11-19T04:01:00Z',
      recordsPerPart: 5,
    });
    await app.runner.tick();
    await app.runner.drain();
    expect(deleted).toBe(true);
    const afterOutage = await tableRows(app.runtime.storage.partsTable);
    // Nothing blamed on the source: the parts that could not land say why, and go to the poison queue for requeue.
    for (const row of afterOutage.filter((p) => p.status !== 'landed')) {
      expect(String(row.lastError)).toMatch(/landing container .* does not exist/);
      expect(String(row.lastError)).not.toMatch(/source/);
    }
    expect(await app.runtime.landing.exists()).toBe(false);

    // The operator recreates the container (azd provision) and runs again: the three parts whose blobs went with
    // the container are found out at the completion check and copied again; the manifest lists only what is there.
    await app.runtime.landing.createIfNotExists();
    for (let tick = 0; tick < 3; tick++) {
      stack.simulator.resetRateLimits();
      await app.runner.tick();
      await app.runner.drain();
    }
    const { snapshots, blobs } = await state(app);
    expect(snapshots[0]).toMatchObject({ status: 'complete', partsLanded: snap.parts.length });
    const manifest = JSON.parse(
      (
        await app.runtime.landing
          .getBlobClient('hardware-firmware/snapshot=2026-11-19T0401Z/_manifest.json')
          .downloadToBuffer()
      ).toString(),
    ) as { parts: { path: string; bytes: number }[] };
    expect(manifest.parts).toHaveLength(snap.parts.length);
    for (const p of manifest.parts) expect(blobs).toContain(p.path);
    for (const p of snap.parts) {
      const landed = await app.runtime.landing
        .getBlockBlobClient(`hardware-firmware/snapshot=2026-11-19T0401Z/${p.relativePath}`)
        .downloadToBuffer();
      expect(md5(landed)).toBe(p.md5);
    }
    expect(app.events.some((e) => /completion check: its landed blob is missing/.test(String(e.reason)))).toBe(true);
  });

  it('dead-letters a message padded to blow up when escaped: the letter fits a queue message, keeps its reason and no SAS', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'certificates' });
    // Raw control characters: not JSON, 44 KB as sent, six times that once escaped into a letter.
    const padded = `{"v":1,"sourceUrl":"https://evil.blob.core.windows.net/c/2026-11-19/0001/x/json/a.json.gz?sv=2024&sig=LIVESIGNATURE123","padding":"${'\u0001'.repeat(44_000)}"}`;
    await app.runtime.queue.sendMessage(Buffer.from(padded).toString('base64'));
    await app.runner.drain();
    const [text, ...more] = await queueTexts(app, 'poison');
    expect(more).toEqual([]);
    expect(text?.length).toBeLessThanOrEqual(48 * 1024);
    const letter = JSON.parse(Buffer.from(text ?? '', 'base64').toString()) as DeadLetter;
    expect(letter.reason).toMatch(/not JSON.*\(original cut to \d+ of \d+ characters\)/);
    expect(letter.original).not.toMatch(/LIVESIGNATURE123/);
    expect(JSON.stringify(letter)).not.toMatch(/LIVESIGNATURE123/);
  });

  it('marks a part whose source blob is gone failed, and leaves the snapshot visibly incomplete', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'certificates' });
    const snap = await stack.simulator.publish('certificates', {
      generatedTime: '2026-11-19T06:01:00Z',
      recordsPerPart: 5,
    });
    stack.simulator.injectFault('certificates', { kind: 'missing-blob' });
    await app.runner.tick();
    await app.runner.drain();
    const { snapshots, parts, blobs } = await state(app);
    expect(parts.filter((p) => p.status === 'landed')).toHaveLength(snap.parts.length);
    const failed = parts.filter((p) => p.status === 'failed');
    expect(failed).toHaveLength(1);
    expect(failed[0]?.lastError).toMatch(/404|not ?found/i);
    expect(snapshots[0]).toMatchObject({
      status: 'failed',
      partCount: snap.parts.length + 1,
      partsLanded: snap.parts.length,
    });
    expect(snapshots[0]?.lastError).toMatch(/_RbacGroupId=99/);
    expect(blobs.some((b) => b.endsWith('_manifest.json'))).toBe(false);
    expect(await queueTexts(app, 'poison')).toEqual([]);
  });

  it('refuses a truncated gzip part in stream mode and commits nothing for it', async () => {
    const app = await createApp(stack, {
      MDVM_EXPORTS: 'security-baselines',
      MDVM_COPY_MODE: 'stream',
      MDVM_COUNT_RECORDS: 'true',
    });
    const snap = await stack.simulator.publish('security-baselines', {
      generatedTime: '2026-11-19T12:01:00Z',
      recordsPerPart: 200,
    });
    const victim = snap.parts[0];
    if (!victim) throw new Error('no part');
    const blob = stack.simulator.sourceContainer(snap).getBlockBlobClient(victim.blobName);
    const bytes = await blob.downloadToBuffer();
    await blob.uploadData(bytes.subarray(0, Math.floor(bytes.length / 2)));
    await app.runner.tick();
    await app.runner.drain();
    const { parts, blobs } = await state(app);
    const row = parts.find((p) => p.path === victim.relativePath);
    expect(row).toMatchObject({ status: 'failed', lastError: expect.stringMatching(/not a complete gzip stream/) });
    expect(blobs.some((b) => b.endsWith(victim.relativePath))).toBe(false);
    expect(parts.filter((p) => p.status === 'landed')).toHaveLength(snap.parts.length - 1);
  });

  it('treats a 403 from the copy source as an expired SAS without burning retries', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'software-vulnerabilities' });
    const snap = await stack.simulator.publish('software-vulnerabilities', {
      generatedTime: '2026-11-19T18:01:00Z',
      recordsPerPart: 5,
    });
    await app.runner.tick();
    // One URL's SAS is no longer accepted (revoked key, clock skew): only the storage service knows.
    const messages = await takeQueuedMessages(app);
    const [victim, ...rest] = messages;
    if (!victim) throw new Error('no message');
    const broken = new URL(victim.sourceUrl);
    broken.searchParams.set('sig', Buffer.from('not-the-signature').toString('base64'));
    await app.runtime.queue.sendMessage(encodeMessage({ ...victim, sourceUrl: broken.toString() }));
    for (const m of rest) await app.runtime.queue.sendMessage(encodeMessage(m));
    await app.runner.drain();
    const { parts } = await state(app);
    const expired = parts.filter((p) => p.status === 'expired');
    expect(expired.map((p) => p.path)).toEqual([victim.part]);
    expect(expired[0]?.attempts).toBe(1);
    expect(expired[0]?.lastError).toMatch(/403/);
    expect(await queueTexts(app, 'poison')).toEqual([]);

    // The next tick finds the part `expired` and resumes it with a fresh URL.
    await app.runner.tick();
    await app.runner.drain();
    const after = await state(app);
    expect(after.parts.every((p) => p.status === 'landed')).toBe(true);
    expect(after.snapshots[0]).toMatchObject({ status: 'complete', partsLanded: snap.parts.length });
  });

  it('survives crashes mid-copy: leftover blocks, a stale blob and a copy that landed before the crash', async () => {
    let crashed = false;
    const app = await createApp(
      stack,
      {
        MDVM_EXPORTS: 'software-inventory',
        MDVM_COPY_SINGLE_SHOT_MAX_MIB: '0.0625',
        MDVM_COPY_BLOCK_SIZE_MIB: '0.0625',
      },
      {
        wrapCopier: (real) => ({
          copy: async (request) => {
            if (!crashed && request.landingPath.includes('_RbacGroupId=12/part-00000')) {
              crashed = true;
              // Half a block copy, then the process dies.
              const dest = app.runtime.landing.getBlockBlobClient(request.landingPath);
              await dest.stageBlockFromURL(
                Buffer.from('mdvm-block-000000').toString('base64'),
                request.sourceUrl,
                0,
                1024,
              );
              throw new Error('simulated crash mid-copy');
            }
            return real.copy(request);
          },
        }),
      },
    );
    const snap = await stack.simulator.publish('software-inventory', {
      generatedTime: '2026-11-18T00:01:00Z',
      recordsPerPart: 600,
    });
    const folder = 'software-inventory/snapshot=2026-11-18T0001Z';
    const [stale, early] = snap.parts.filter((p) => p.relativePath.includes('_RbacGroupId=31'));
    if (!stale || !early) throw new Error('expected parts in group 31');
    await app.runtime.landing.createIfNotExists();
    await app.runtime.landing
      .getBlockBlobClient(`${folder}/${stale.relativePath}`)
      .uploadData(Buffer.from('other bytes'));
    const earlyBytes = await stack.simulator
      .sourceContainer(snap)
      .getBlockBlobClient(early.blobName)
      .downloadToBuffer();
    // Our own earlier copy, which landed just before the process died (before the row was updated).
    await app.runtime.landing.getBlockBlobClient(`${folder}/${early.relativePath}`).uploadData(earlyBytes, {
      metadata: {
        mdvm_export: 'software-inventory',
        mdvm_generated_time: '2026-11-18T00:01:00Z',
        mdvm_source_path: stack.simulator.sourceContainer(snap).getBlockBlobClient(early.blobName).url,
      },
    });

    await app.runner.tick();
    await app.runner.drain();
    expect(crashed).toBe(true);
    const { snapshots, parts } = await state(app);
    expect(snapshots[0]).toMatchObject({ status: 'complete', partsLanded: snap.parts.length });
    for (const p of snap.parts) {
      const landed = await app.runtime.landing.getBlockBlobClient(`${folder}/${p.relativePath}`).downloadToBuffer();
      expect(md5(landed)).toBe(p.md5);
    }
    expect(parts.find((p) => p.path === early.relativePath)?.copyMethod).toBe('already-landed');
    expect(parts.find((p) => p.path === stale.relativePath)?.copyMethod).not.toBe('already-landed');
    const crashedRow = parts.find((p) => String(p.path).includes('_RbacGroupId=12/part-00000'));
    expect(crashedRow).toMatchObject({ status: 'landed', attempts: 2 });
  });

  it('completes a snapshot whose last part landed just before a crash, on the redelivery, copying nothing again', async () => {
    let crashes = 0;
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'software-inventory-noncpe' },
      {
        workers: 1,
        wrapRuntime: replacing('store', (real) => ({
          partProgress: async (exportId, snapshotId) => {
            const progress = await real.partProgress(exportId, snapshotId);
            // The process dies right after the last part row says landed, before the snapshot is completed.
            if (progress.state === 'all-landed' && crashes === 0) {
              crashes++;
              throw new Error('simulated crash before completion');
            }
            return progress;
          },
        })),
      },
    );
    const snap = await stack.simulator.publish('software-inventory-noncpe', {
      generatedTime: '2026-11-17T06:01:00Z',
      recordsPerPart: 5,
    });
    await app.runner.tick();
    await app.runner.drain();
    expect(crashes).toBe(1);
    const [snapshot] = await tableRows(app.runtime.storage.snapshotsTable);
    expect(snapshot).toMatchObject({ status: 'complete', partsLanded: snap.parts.length });
    expect(await listBlobNames(app, 'software-inventory-noncpe/snapshot=2026-11-17T0601Z/_manifest.json')).toHaveLength(
      1,
    );
    // Every part landed once; the crashed delivery's redelivery found its part landed, copied nothing, completed.
    expect(app.events.filter((e) => e.event === 'part' && e.outcome === 'landed')).toHaveLength(snap.parts.length);
    expect(app.events.filter((e) => e.event === 'part' && e.outcome === 'duplicate')).toHaveLength(1);
    expect(app.events.filter((e) => e.event === 'snapshot' && e.outcome === 'completed')).toHaveLength(1);
  });

  it('completes the snapshot when the last flip was committed but answered as a conflict (a lost response, retried)', async () => {
    let flips = 0;
    let partCount = Number.POSITIVE_INFINITY;
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'software-inventory-noncpe' },
      {
        workers: 1,
        wrapRuntime: replacing('store', (real) => ({
          updatePart: async (current, changes) => {
            await real.updatePart(current, changes);
            // The last flip reaches the table, its response does not, and the retry meets the row's new ETag.
            if (changes.status === 'landed' && ++flips === partCount) throw new ConcurrentUpdateError();
          },
        })),
      },
    );
    const snap = await stack.simulator.publish('software-inventory-noncpe', {
      generatedTime: '2026-11-22T05:01:00Z',
      recordsPerPart: 2,
    });
    partCount = snap.parts.length;
    await app.runner.tick();
    await app.runner.drain();
    expect(flips).toBe(partCount);
    const after = await state(app);
    expect(after.snapshots[0]).toMatchObject({ status: 'complete', partsLanded: partCount });
    expect(after.blobs.filter((b) => b.endsWith('/_manifest.json'))).toHaveLength(1);
  });

  it('a failed in-flight mark mid-tick fails the tick; the next tick sends the unmarked parts again, each lands once', async () => {
    let marks = 0;
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'software-inventory-noncpe' },
      {
        workers: 8,
        wrapRuntime: replacing('store', (real) => ({
          // The second hundred's mark fails: the sends under way finish, and no more go out.
          markInFlight: (...args) =>
            ++marks === 2
              ? Promise.reject(new MdvmError('transient', 'table unavailable during the mark'))
              : real.markInFlight(...args),
        })),
      },
    );
    const snap = await publishTwoAndAHalfHundredParts('2026-11-22T03:01:00Z');
    const [first] = await app.runner.tick();
    expect(first?.error).toMatch(/table unavailable during the mark/);
    // The first hundred are marked in flight; the second hundred are not, though their messages are out.
    const rows = await tableRows(app.runtime.storage.partsTable);
    expect(rows.filter((r) => r.sasExpiresOn).length).toBe(100);
    expect((await app.runtime.queue.getProperties()).approximateMessagesCount ?? 0).toBeGreaterThanOrEqual(200);

    const after = await tickCleanlyAndDrain(app);
    expect(after.snapshots[0]).toMatchObject({ status: 'complete', partsLanded: snap.parts.length });
    const landedEvents = app.events.filter((e) => e.event === 'part' && e.outcome === 'landed');
    expect(new Set(landedEvents.map((e) => e.part)).size).toBe(snap.parts.length);
    expect(landedEvents).toHaveLength(snap.parts.length);
    // The unmarked parts went out twice: their second delivery copies nothing.
    expect(app.events.filter((e) => e.event === 'part' && e.outcome === 'duplicate').length).toBeGreaterThanOrEqual(
      100,
    );
    expect(after.blobs.filter((b) => b.endsWith('.json.gz'))).toHaveLength(snap.parts.length);
  });

  it('a failed send mid-tick fails the tick with every part sent before it marked in flight; the next tick sends only the rest', async () => {
    let sends = 0;
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'software-inventory-noncpe' },
      {
        workers: 8,
        wrapRuntime: replacing('queue', (real) => ({
          // Mid-way through the second hundred: the sends before it are out, their mark not yet due.
          sendMessage: (...args) =>
            ++sends === 130 ? Promise.reject(new Error('queue unavailable')) : real.sendMessage(...args),
        })),
      },
    );
    const snap = await publishTwoAndAHalfHundredParts('2026-11-22T04:01:00Z');
    const [first] = await app.runner.tick();
    expect(first?.error).toMatch(/queue unavailable/);
    const queued = (await app.runtime.queue.getProperties()).approximateMessagesCount ?? 0;
    expect(queued).toBeGreaterThanOrEqual(129);
    expect(queued).toBeLessThan(snap.parts.length);
    // Exactly the parts whose message went out are marked: none is sent twice, none is left without a message.
    const rows = await tableRows(app.runtime.storage.partsTable);
    expect(rows.filter((r) => r.sasExpiresOn).length).toBe(queued);

    stack.simulator.resetRateLimits();
    const [second] = await app.runner.tick();
    expect(second?.error).toBeUndefined();
    // Nothing was drained yet: one message per part in the queue, none twice.
    expect((await app.runtime.queue.getProperties()).approximateMessagesCount).toBe(snap.parts.length);
    await app.runner.drain();
    const after = await state(app);
    expect(after.snapshots[0]).toMatchObject({ status: 'complete', partsLanded: snap.parts.length });
    const landedEvents = app.events.filter((e) => e.event === 'part' && e.outcome === 'landed');
    expect(landedEvents).toHaveLength(snap.parts.length);
    expect(app.events.filter((e) => e.event === 'part' && e.outcome === 'duplicate')).toHaveLength(0);
  });

  it('a failed send whose clean-up mark fails too reports both; the next tick sends the unmarked parts again, each lands once', async () => {
    let sends = 0;
    let marks = 0;
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'software-inventory-noncpe' },
      {
        workers: 8,
        wrapRuntime: (runtime) =>
          replacing('store', (real) => ({
            // The first hundred are marked; the mark after the failed send (the clean-up) fails.
            markInFlight: (...args) =>
              ++marks === 2
                ? Promise.reject(new MdvmError('transient', 'table unavailable during the mark'))
                : real.markInFlight(...args),
          }))(
            replacing('queue', (real) => ({
              sendMessage: (...args) =>
                ++sends === 130 ? Promise.reject(new Error('queue unavailable')) : real.sendMessage(...args),
            }))(runtime),
          ),
      },
    );
    const snap = await publishTwoAndAHalfHundredParts('2026-11-22T06:01:00Z');
    const [first] = await app.runner.tick();
    const queued = (await app.runtime.queue.getProperties()).approximateMessagesCount ?? 0;
    const unmarked = queued - 100;
    expect(unmarked).toBeGreaterThanOrEqual(29);
    expect(first?.error).toMatch(/queue unavailable/);
    expect(first?.error).toMatch(
      new RegExp(`marking ${unmarked} sent part\\(s\\) in flight failed too.*table unavailable`),
    );
    const rows = await tableRows(app.runtime.storage.partsTable);
    expect(rows.filter((r) => r.sasExpiresOn).length).toBe(100);

    const after = await tickCleanlyAndDrain(app);
    expect(after.snapshots[0]).toMatchObject({ status: 'complete', partsLanded: snap.parts.length });
    expect(app.events.filter((e) => e.event === 'part' && e.outcome === 'landed')).toHaveLength(snap.parts.length);
    expect(app.events.filter((e) => e.event === 'part' && e.outcome === 'duplicate')).toHaveLength(unmarked);
  });

  it('a row transaction that fails mid-tick stops the sends at its hundred: no message without its row; the next tick writes and sends the rest', async () => {
    let transactions = 0;
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'software-inventory-noncpe' },
      {
        workers: 8,
        wrapRuntime: replacing('store', (real) => ({
          insertParts: (rows) =>
            ++transactions === 2
              ? Promise.reject(new MdvmError('transient', 'table unavailable during the insert'))
              : real.insertParts(rows),
        })),
      },
    );
    const snap = await publishTwoAndAHalfHundredParts('2026-11-22T07:01:00Z');
    const [first] = await app.runner.tick();
    expect(first?.error).toMatch(/table unavailable during the insert/);
    // The first hundred rows exist and their messages are out and marked; nothing after the failed transaction.
    const rows = await tableRows(app.runtime.storage.partsTable);
    expect(rows).toHaveLength(100);
    expect(rows.filter((r) => r.sasExpiresOn)).toHaveLength(100);
    const messages = await takeQueuedMessages(app);
    const recorded = new Set(rows.map((r) => r.path));
    expect(messages).toHaveLength(100);
    expect(messages.filter((m) => !recorded.has(m.part))).toEqual([]);
    // The taken messages go back, as if still in flight.
    for (const m of messages) await app.runtime.queue.sendMessage(encodeMessage(m));

    const after = await tickCleanlyAndDrain(app);
    expect(after.snapshots[0]).toMatchObject({ status: 'complete', partsLanded: snap.parts.length });
    const landedEvents = app.events.filter((e) => e.event === 'part' && e.outcome === 'landed');
    expect(landedEvents).toHaveLength(snap.parts.length);
    expect(new Set(landedEvents.map((e) => e.part)).size).toBe(snap.parts.length);
    expect(app.events.filter((e) => e.event === 'part' && e.outcome === 'duplicate')).toHaveLength(0);
  });

  it('a tick stopped part-way writes no row past the transaction under way; the next tick records and sends the rest', async () => {
    const interrupt = new AbortController();
    let sends = 0;
    let transactions = 0;
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'software-inventory-noncpe' },
      {
        wrapRuntime: watchingTick({
          // The third transaction starts only after the stop, so the rows cannot all be written before it.
          beforeRowWrite: (n) => {
            transactions = n;
            return n === 3 && !interrupt.signal.aborted
              ? new Promise((resolve) => interrupt.signal.addEventListener('abort', resolve, { once: true }))
              : undefined;
          },
          beforeSend: (n) => {
            sends = n;
            if (n === 150) interrupt.abort();
          },
        }),
      },
    );
    const snap = await stack.simulator.publish('software-inventory-noncpe', {
      generatedTime: '2026-11-22T08:01:00Z',
      groups: [0, 1, 2, 3, 4],
      partsPerGroup: 99,
      recordsPerPart: 1,
    });
    expect(snap.parts).toHaveLength(500);
    stack.simulator.resetRateLimits();
    const stopped = requestSnapshot(app.runtime, quietTelemetry(), 'software-inventory-noncpe', {
      abortSignal: interrupt.signal,
    });
    await expect(stopped).rejects.toThrow(/tick stopped after enqueuing \d+ of 500 parts/);
    // Two transactions cover the first 150 sends; the one under way when the stop came ends, and no other starts.
    expect(transactions).toBe(3);
    const rows = await tableRows(app.runtime.storage.partsTable);
    expect(rows.length).toBe(transactions * 100);
    expect(rows.filter((r) => r.sasExpiresOn).length).toBe(sends);

    const after = await tickCleanlyAndDrain(app);
    expect(after.snapshots[0]).toMatchObject({ status: 'complete', partsLanded: 500 });
    expect(app.events.filter((e) => e.event === 'part' && e.outcome === 'landed')).toHaveLength(500);
  });

  it('a part that fails while the tick still writes rows of parts dead on arrival fails the snapshot once they are written', async () => {
    let releaseLastWrite = (): void => {};
    const lastWriteHeld = new Promise<void>((resolve) => {
      releaseLastWrite = resolve;
    });
    let sends = 0;
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'software-inventory-noncpe' },
      {
        wrapRuntime: watchingTick({
          beforeRowWrite: (n) => (n === 3 ? lastWriteHeld : undefined),
          afterSend: (n) => {
            sends = n;
          },
        }),
      },
    );
    const snap = await publishTwoAndAHalfHundredParts('2026-11-22T09:01:00Z');
    const org = snap.parts[0]?.relativePath.split('/')[0] ?? '';
    const missing = `${snap.prefix}/${org}/_RbacGroupId=0/part-00000-aaaa-missing.c000.json.gz`;
    // The first 200 files are live (one more, first, is gone at the source); the last 51 come with a SAS already dead.
    stack.simulator.injectFault('software-inventory-noncpe', {
      kind: 'rewrite',
      rewrite: (body, sign) => {
        const dead = (url: string) => url.replace(/([?&]se=)[^&]+/, `$1${encodeURIComponent('2026-01-01T00:00:00Z')}`);
        return {
          ...body,
          exportFiles: [sign(missing), ...body.exportFiles.slice(0, 199), ...body.exportFiles.slice(199).map(dead)],
        };
      },
    });
    const ticking = app.runner.tick();
    while (sends < 200) await sleep(20);
    // Every live part settles, the missing one failed for good, while the dead-on-arrival rows wait to be written.
    await app.runner.drain();
    expect((await tableRows(app.runtime.storage.snapshotsTable))[0]).toMatchObject({ status: 'copying' });
    releaseLastWrite();
    const [report] = await ticking;
    expect(report?.error).toBeUndefined();
    // Nothing is in flight any more and a part failed: the tick itself says so, as the last landing would have.
    expect((await tableRows(app.runtime.storage.snapshotsTable))[0]).toMatchObject({
      status: 'failed',
      partsLanded: 199,
      partCount: 251,
    });
  });

  it('a failed part requeued by a tick that stops before its send is sent by the next tick, not left for the old SAS', async () => {
    let sourceGone: string | undefined;
    let copiesOfIt = 0;
    let queueDown = false;
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'certificates' },
      {
        wrapCopier: (real) => ({
          copy: (request: CopyRequest) => {
            sourceGone ??= request.landingPath;
            // The first copy of one part finds its source gone; a later one finds it back.
            return request.landingPath === sourceGone && ++copiesOfIt === 1
              ? Promise.reject(new MdvmError('not-found', 'source blob not found (404)'))
              : real.copy(request);
          },
        }),
        wrapRuntime: replacing('queue', (real) => ({
          sendMessage: (...args) =>
            queueDown ? Promise.reject(new Error('queue unavailable')) : real.sendMessage(...args),
        })),
      },
    );
    const snap = await stack.simulator.publish('certificates', {
      generatedTime: '2026-11-22T05:01:00Z',
      recordsPerPart: 2,
    });
    await app.runner.tick();
    await app.runner.drain();
    const failed = (await state(app)).parts.filter((p) => p.status === 'failed');
    expect(failed).toHaveLength(1);
    // Its SAS is still good for hours: the copy failed, not the URL.
    expect(Date.parse(String(failed[0]?.sasExpiresOn))).toBeGreaterThan(Date.now() + 3_600_000);

    // The next tick puts the part back to queued, then cannot send its message.
    queueDown = true;
    stack.simulator.resetRateLimits();
    const [second] = await app.runner.tick();
    expect(second?.error).toMatch(/queue unavailable/);
    const requeued = await app.runtime.store.getPart(
      'certificates',
      String(failed[0]?.snapshotId),
      String(failed[0]?.path),
    );
    expect(requeued?.value.status).toBe('queued');
    expect(requeued?.value.sasExpiresOn).toBeUndefined();

    // The tick after that sends it at once and the snapshot completes.
    queueDown = false;
    stack.simulator.resetRateLimits();
    const [third] = await app.runner.tick();
    expect(third?.error).toBeUndefined();
    expect((await app.runtime.queue.getProperties()).approximateMessagesCount).toBe(1);
    await app.runner.drain();
    const after = await state(app);
    expect(after.snapshots[0]).toMatchObject({ status: 'complete', partsLanded: snap.parts.length });
    expect(after.parts.every((p) => p.status === 'landed')).toBe(true);
  });

  it('a landing returns only after a completion check saw its flip, even with another delivery of the part still copying', async () => {
    // The second delivery is on its last attempt: if the landing left the check to it and it then failed (or the
    // process died), its message would go to the poison queue and no check would ever come.
    let holdCopy: { started: () => void; release: Promise<void> } | undefined;
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'software-inventory-noncpe' },
      {
        wrapCopier: (real) => ({
          copy: async (request: CopyRequest) => {
            const hold = holdCopy;
            holdCopy = undefined;
            if (hold) {
              hold.started();
              await hold.release;
            }
            return real.copy(request);
          },
        }),
      },
    );
    const generatedTime = '2026-11-22T04:01:00Z';
    await stack.simulator.publish('software-inventory-noncpe', { generatedTime, recordsPerPart: 3 });
    stack.simulator.resetRateLimits();
    await app.runner.tick();
    const messages: PartMessage[] = [];
    for (let batch = await app.runtime.queue.receiveMessages({ numberOfMessages: 32 }); ; ) {
      if (batch.receivedMessageItems.length === 0) break;
      for (const m of batch.receivedMessageItems) {
        messages.push(JSON.parse(Buffer.from(m.messageText, 'base64').toString('utf8')) as PartMessage);
        await app.runtime.queue.deleteMessage(m.messageId, m.popReceipt);
      }
      batch = await app.runtime.queue.receiveMessages({ numberOfMessages: 32 });
    }
    const last = messages.pop();
    if (!last) throw new Error('the tick enqueued nothing');
    const telemetry = new Telemetry({ info() {}, warn() {}, error() {} });
    for (const m of messages)
      expect((await landPart(app.runtime, telemetry, m, { dequeueCount: 1 })).outcome).toBe('landed');

    let release = () => {};
    const copying = new Promise<void>((started) => {
      holdCopy = { started, release: new Promise<void>((resolve) => (release = resolve)) };
    });
    const slow = landPart(app.runtime, telemetry, last, { dequeueCount: MAX_DEQUEUE_COUNT });
    await copying;
    expect((await landPart(app.runtime, telemetry, last, { dequeueCount: 1 })).outcome).toBe('landed');
    // Its message may be deleted now: the snapshot is already complete.
    expect((await app.runtime.store.getSnapshot('software-inventory-noncpe', generatedTime))?.value.status).toBe(
      'complete',
    );
    release();
    expect((await slow).outcome).toBe('duplicate');
  });

  it('_latest.json never moves back to an older snapshot', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'software-inventory-noncpe' });
    await stack.simulator.publish('software-inventory-noncpe', {
      generatedTime: '2026-11-12T12:01:00Z',
      recordsPerPart: 3,
    });
    await app.runner.tick();
    await app.runner.drain();
    // Defender hands out an older snapshot afterwards (a regional failover, say): it lands, but is not "latest".
    await stack.simulator.publish('software-inventory-noncpe', {
      generatedTime: '2026-11-12T06:01:00Z',
      recordsPerPart: 3,
    });
    stack.simulator.resetRateLimits();
    await app.runner.tick();
    await app.runner.drain();
    const snapshots = await tableRows(app.runtime.storage.snapshotsTable);
    expect(snapshots.map((r) => r.status)).toEqual(['complete', 'complete']);
    const latest = JSON.parse(
      (
        await app.runtime.landing.getBlockBlobClient('software-inventory-noncpe/_latest.json').downloadToBuffer()
      ).toString(),
    );
    expect(latest.snapshot).toBe('2026-11-12T1201Z');
  });

  it('parks a part that keeps failing transiently on the poison queue after 5 attempts, marked failed', async () => {
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'browser-extensions' },
      {
        wrapCopier: (real) => ({
          copy: async (request) => {
            if (request.landingPath.includes('_RbacGroupId=0/part-00000')) {
              throw new MdvmError('transient', 'copy from source failed: 503 ServerBusy');
            }
            return real.copy(request);
          },
        }),
      },
    );
    const snap = await stack.simulator.publish('browser-extensions', {
      generatedTime: '2026-11-18T06:01:00Z',
      recordsPerPart: 5,
    });
    await app.runner.tick();
    await app.runner.drain();
    const { parts, snapshots } = await state(app);
    const row = parts.find((p) => String(p.path).includes('_RbacGroupId=0/part-00000'));
    expect(row).toMatchObject({ status: 'failed', attempts: 5, lastError: expect.stringMatching(/503 ServerBusy/) });
    expect(snapshots[0]).toMatchObject({ status: 'failed', partsLanded: snap.parts.length - 1 });
    // The snapshot names the part that stopped it and why, for `mdvm-ingest status`.
    expect(snapshots[0]?.lastError).toMatch(/_RbacGroupId=.*out of attempts \(5\): .*503 ServerBusy/);
    const poison = await queueTexts(app, 'poison');
    expect(poison).toHaveLength(1);
    // The host parks the original message; it is still a valid part message for a later requeue.
    expect(JSON.parse(Buffer.from(poison[0] ?? '', 'base64').toString())).toMatchObject({ v: 1, part: row?.path });
  });

  it('refuses a source replaced between reading it and copying it, and lands the new bytes on the retry', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'browser-extensions' });
    const snap = await stack.simulator.publish('browser-extensions', {
      generatedTime: '2026-11-18T07:01:00Z',
      recordsPerPart: 40,
    });
    const target = snap.parts[0];
    if (!target) throw new Error('expected a part');
    const sourceBlob = stack.simulator.sourceContainer(snap).getBlockBlobClient(target.blobName);
    const original = await sourceBlob.downloadToBuffer();
    // Same length, other bytes.
    const replacement = Buffer.from(original.map((b, i) => (i === original.length - 1 ? b ^ 0xff : b)));
    let replaced = false;
    const realGetProperties = BlobClient.prototype.getProperties;
    const spy = vi.spyOn(BlobClient.prototype, 'getProperties').mockImplementation(async function (
      this: BlobClient,
      options,
    ) {
      const props = await realGetProperties.call(this, options);
      if (!replaced && this.name === target.blobName) {
        replaced = true;
        await sourceBlob.uploadData(replacement);
      }
      return props;
    });
    try {
      await app.runner.tick();
      await app.runner.drain();
    } finally {
      spy.mockRestore();
    }
    expect(replaced).toBe(true);
    const { parts, snapshots } = await state(app);
    expect(snapshots[0]).toMatchObject({ status: 'complete' });
    const row = parts.find((p) => p.path === target.relativePath);
    expect(row).toMatchObject({ status: 'landed', attempts: 2, bytes: replacement.length });
    const landed = await app.runtime.landing
      .getBlockBlobClient(`browser-extensions/snapshot=2026-11-18T0701Z/${target.relativePath}`)
      .downloadToBuffer();
    expect(md5(landed)).toBe(md5(replacement));
    expect(app.events.some((e) => e.outcome === 'retry' && /source changed/.test(String(e.reason)))).toBe(true);
  });

  it.each([
    [
      'block path (Put Block From URL)',
      { MDVM_COPY_SINGLE_SHOT_MAX_MIB: '0.0625', MDVM_COPY_BLOCK_SIZE_MIB: '0.0625' },
    ],
    ['stream path', { MDVM_COPY_MODE: 'stream', MDVM_STREAM_BUFFER_MIB: '1' }],
  ] as [string, Record<string, string>][])(
    'never lands a splice of two versions when the source is replaced during a %s copy',
    async (_path, settings) => {
      const app = await createApp(stack, { MDVM_EXPORTS: 'secure-configuration', ...settings }, { workers: 1 });
      const snap = await stack.simulator.publish('secure-configuration', {
        generatedTime: '2026-11-18T08:01:00Z',
        groups: [0],
        partsPerGroup: 1,
        recordsPerPart: 4_000,
      });
      const target = snap.parts[0];
      if (!target) throw new Error('expected a part');
      const sourceBlob = stack.simulator.sourceContainer(snap).getBlockBlobClient(target.blobName);
      const original = await sourceBlob.downloadToBuffer();
      expect(original.length).toBeGreaterThan(3 * 64 * 1024);
      const replacement = Buffer.from(original.map((b) => b ^ 0x5a));
      let replaced = false;
      const replaceOnce = async () => {
        if (replaced) return;
        replaced = true;
        await sourceBlob.uploadData(replacement);
      };
      // Replace the source after the first block of the first attempt has been read.
      const realStageFromUrl = BlockBlobClient.prototype.stageBlockFromURL;
      const realGetProperties = BlobClient.prototype.getProperties;
      const spies = [
        vi.spyOn(BlockBlobClient.prototype, 'stageBlockFromURL').mockImplementation(async function (
          this: BlockBlobClient,
          ...args: Parameters<BlockBlobClient['stageBlockFromURL']>
        ) {
          const response = await realStageFromUrl.apply(this, args);
          await replaceOnce();
          return response;
        }),
        vi.spyOn(BlobClient.prototype, 'getProperties').mockImplementation(async function (this: BlobClient, options) {
          const props = await realGetProperties.call(this, options);
          // Stream path: between reading the source's properties and downloading it.
          if (settings.MDVM_COPY_MODE === 'stream' && this.name === target.blobName) await replaceOnce();
          return props;
        }),
      ];
      try {
        await app.runner.tick();
        await app.runner.drain();
      } finally {
        for (const spy of spies) spy.mockRestore();
      }
      expect(replaced).toBe(true);
      const { parts, snapshots } = await state(app);
      expect(snapshots[0]).toMatchObject({ status: 'complete' });
      expect(parts[0]).toMatchObject({ status: 'landed', attempts: 2, bytes: replacement.length });
      const landed = await app.runtime.landing
        .getBlockBlobClient(`secure-configuration/snapshot=2026-11-18T0801Z/${target.relativePath}`)
        .downloadToBuffer();
      expect(md5(landed)).toBe(md5(replacement));
      expect(app.events.some((e) => e.outcome === 'retry' && /source changed/.test(String(e.reason)))).toBe(true);
    },
  );
  it('block path: a late block of one delivery never lands in the block list another delivery of the part commits', async () => {
    const app = await createApp(
      stack,
      {
        MDVM_EXPORTS: 'secure-configuration',
        MDVM_COPY_SINGLE_SHOT_MAX_MIB: '0.0625',
        MDVM_COPY_BLOCK_SIZE_MIB: '0.0625',
      },
      { workers: 1 },
    );
    const snap = await stack.simulator.publish('secure-configuration', {
      generatedTime: '2026-11-18T09:01:00Z',
      groups: [0],
      partsPerGroup: 1,
      recordsPerPart: 4_000,
    });
    await app.runner.tick();
    const [message] = await takeQueuedMessages(app);
    const target = snap.parts[0];
    if (!message || !target) throw new Error('expected one part');
    const sourceBlob = stack.simulator.sourceContainer(snap).getBlockBlobClient(target.blobName);
    const original = await sourceBlob.downloadToBuffer();
    expect(original.length).toBeGreaterThan(3 * 64 * 1024);
    const replacement = Buffer.from(original.map((b) => b ^ 0x5a));
    const row = await app.runtime.store.getPart('secure-configuration', message.snapshot, message.part);
    const request = {
      sourceUrl: message.sourceUrl,
      landingPath: String(row?.value.landingPath),
      metadata: { mdvm_generated_time: message.generatedTime, mdvm_source_path: String(row?.value.sourcePath) },
    };

    // Delivery A reads block 0 of the old version, but its Put Block lands only after delivery B (which read the
    // new version) has staged its own block 0, and before B commits: what Azure does with a slow Put Block From URL.
    let secondBlockZero: () => void = () => {};
    const bStagedBlockZero = new Promise<void>((resolve) => {
      secondBlockZero = resolve;
    });
    let lateBlockDone: () => void = () => {};
    const aLateBlockLanded = new Promise<void>((resolve) => {
      lateBlockDone = resolve;
    });
    let blockZeroCalls = 0;
    let stagedByA = 0;
    const realStageFromUrl = BlockBlobClient.prototype.stageBlockFromURL;
    const realCommit = BlockBlobClient.prototype.commitBlockList;
    const spies = [
      vi.spyOn(BlockBlobClient.prototype, 'stageBlockFromURL').mockImplementation(async function (
        this: BlockBlobClient,
        ...args: Parameters<BlockBlobClient['stageBlockFromURL']>
      ) {
        const [id, , offset, count] = args;
        if (offset === 0 && ++blockZeroCalls === 1) {
          const oldBytes = original.subarray(0, count);
          await bStagedBlockZero;
          const response = await this.stageBlock(id, oldBytes, oldBytes.length);
          lateBlockDone();
          return response as unknown as Awaited<ReturnType<BlockBlobClient['stageBlockFromURL']>>;
        }
        const response = await realStageFromUrl.apply(this, args);
        if (offset === 0) secondBlockZero();
        else if (blockZeroCalls === 1) stagedByA++;
        return response;
      }),
      vi.spyOn(BlockBlobClient.prototype, 'commitBlockList').mockImplementation(async function (
        this: BlockBlobClient,
        ...args: Parameters<BlockBlobClient['commitBlockList']>
      ) {
        await aLateBlockLanded;
        return realCommit.apply(this, args);
      }),
    ];
    try {
      const deliveryA = app.runtime.copier.copy(request);
      const blocks = Math.ceil(original.length / (64 * 1024));
      await vi.waitFor(() => expect(stagedByA).toBe(blocks - 1), { timeout: 10_000, interval: 20 });
      await sourceBlob.uploadData(replacement);
      const [a, b] = await Promise.allSettled([deliveryA, app.runtime.copier.copy(request)]);
      // A saw the source move under it and commits nothing; B lands the new version whole.
      expect(a.status).toBe('rejected');
      expect(b).toMatchObject({ status: 'fulfilled', value: { bytes: replacement.length } });
    } finally {
      for (const spy of spies) spy.mockRestore();
    }
    const landed = await app.runtime.landing.getBlockBlobClient(request.landingPath).downloadToBuffer();
    expect(md5(landed)).toBe(md5(replacement));
  });
  it('a delivery that read the row before another landed the part never deletes that landed blob, even after the source changed', async () => {
    const quiet = new Telemetry({ info() {}, warn() {}, error() {} });
    const app = await createApp(stack, { MDVM_EXPORTS: 'hardware-firmware' }, { workers: 1 });
    const snap = await stack.simulator.publish('hardware-firmware', {
      generatedTime: '2026-11-17T04:01:00Z',
      groups: [0],
      partsPerGroup: 1,
      recordsPerPart: 50,
    });
    const target = snap.parts[0];
    if (!target) throw new Error('expected one part');
    const sourceBlob = stack.simulator.sourceContainer(snap).getBlockBlobClient(target.blobName);
    const original = await sourceBlob.downloadToBuffer();
    const replacement = Buffer.from(original.map((b, i) => (i === original.length - 1 ? b ^ 0xff : b)));
    await app.runner.tick();
    const [message] = await takeQueuedMessages(app);
    if (!message) throw new Error('no message');
    // Delivery B reads the part row (queued); meanwhile delivery A, on another instance, lands the part and completes
    // the snapshot, and then the source is replaced with other bytes of the same length.
    let raced = false;
    const instanceB = await createApp(stack, app.env, {
      wrapRuntime: replacing('store', (real) => ({
        async getPart(...args: Parameters<typeof real.getPart>) {
          const row = await real.getPart(...args);
          if (!raced) {
            raced = true;
            expect((await landPart(app.runtime, quiet, message, { dequeueCount: 1 })).outcome).toBe('landed');
            await sourceBlob.uploadData(replacement);
          }
          return row;
        },
      })),
    });
    await expect(landPart(instanceB.runtime, quiet, message, { dequeueCount: 1 })).rejects.toThrow(
      /holds a copy of this part from before its source changed.*it is kept/,
    );
    // Its retry finds the part landed and copies nothing.
    expect((await landPart(instanceB.runtime, quiet, message, { dequeueCount: 2 })).outcome).toBe('duplicate');

    const { snapshots, parts } = await state(app);
    expect(snapshots[0]).toMatchObject({ status: 'complete' });
    const folder = 'hardware-firmware/snapshot=2026-11-17T0401Z';
    const manifest = JSON.parse(
      (await app.runtime.landing.getBlockBlobClient(`${folder}/_manifest.json`).downloadToBuffer()).toString(),
    ) as { parts: { md5: string | null }[] };
    const landed = await app.runtime.landing.getBlockBlobClient(`${folder}/${target.relativePath}`).downloadToBuffer();
    expect(md5(landed)).toBe(md5(original));
    expect(manifest.parts[0]?.md5).toBe(md5(original));
    expect(parts[0]).toMatchObject({ status: 'landed', md5: md5(original) });
  });
  it('a blob that is not this part is replaced only while the part row still says it is not landed, from the same source', async () => {
    const quiet = new Telemetry({ info() {}, warn() {}, error() {} });
    const { app, genuine } = await tickAndTakeOneMessage('2026-11-19T05:01:00Z');
    const row = await app.runtime.store.getPart('information-gathering', genuine.snapshot, genuine.part);
    if (!row) throw new Error('no row');
    const blob = app.runtime.landing.getBlockBlobClient(row.value.landingPath);
    await blob.uploadData(Buffer.from('not this part'));
    // Between this delivery's read of the row and its look at the landing name, the row changes: here to landed,
    // as a delivery on another instance would leave it (the bytes it describes are beside the point).
    let changed = false;
    const instance = await createApp(stack, app.env, {
      wrapRuntime: replacing('store', (real) => ({
        async getPart(...args: Parameters<typeof real.getPart>) {
          const current = await real.getPart(...args);
          if (!changed && current) {
            changed = true;
            await real.updatePart(current, {
              status: 'landed',
              bytes: 13,
              landedAt: new Date().toISOString(),
              verification: 'length',
            });
          }
          return current;
        },
      })),
    });
    await expect(landPart(instance.runtime, quiet, genuine, { dequeueCount: 1 })).rejects.toThrow(
      /is taken by a blob that is not this copy of the part, and the part's record changed meanwhile.*nothing replaced/,
    );
    expect((await blob.downloadToBuffer()).toString()).toBe('not this part');
  });
  it('Copy Blob From URL lands over blocks a crashed block-path attempt left uncommitted under the name', async () => {
    const { app, genuine, target } = await tickAndTakeOneMessage('2026-11-19T06:01:00Z');
    const row = await app.runtime.store.getPart('information-gathering', genuine.snapshot, genuine.part);
    if (!row) throw new Error('no row');
    const dest = app.runtime.landing.getBlockBlobClient(row.value.landingPath);
    await dest.stageBlock(Buffer.from('0123456789-000000').toString('base64'), Buffer.from('left over'), 9);
    // Azurite refuses a create-only write over uncommitted blocks (409) although nothing is committed there.
    await expect(dest.getProperties()).rejects.toMatchObject({ statusCode: 404 });

    await app.runtime.queue.sendMessage(encodeMessage(genuine));
    await app.runner.drain();
    expect(
      (await app.runtime.store.getPart('information-gathering', genuine.snapshot, genuine.part))?.value,
    ).toMatchObject({
      status: 'landed',
      copyMethod: 'copy-from-url',
    });
    expect(md5(await dest.downloadToBuffer())).toBe(target.md5);
  });

  it('a snapshot whose derive messages could not be sent completes when a newer one supersedes it, and is derived', async () => {
    let deriveQueueDown = true;
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'browser-extensions', MDVM_CURATED_EXPORTS: 'browser-extensions' },
      {
        wrapRuntime: (runtime) => {
          const queue = runtime.storage.deriveQueue;
          const send = queue.sendMessage.bind(queue);
          queue.sendMessage = (async (...args: Parameters<typeof send>) => {
            if (deriveQueueDown) throw Object.assign(new Error('The server is busy.'), { statusCode: 503 });
            return send(...args);
          }) as typeof queue.sendMessage;
          return runtime;
        },
      },
    );
    await stack.simulator.publish('browser-extensions', { generatedTime: '2026-11-19T01:01:00Z', recordsPerPart: 5 });
    await app.runner.tick();
    await app.runner.drain({ only: 'parts' });
    const first = (await tableRows(app.runtime.storage.snapshotsTable)).find(
      (r) => r.rowKey === '2026-11-19T01:01:00Z',
    );
    expect(first?.status).toBe('copying');

    // Defender already serves a newer snapshot while the queue is still down: the first one, whose manifest is
    // written, is not given up (superseded) but left for a later tick to complete.
    await stack.simulator.publish('browser-extensions', { generatedTime: '2026-11-19T02:01:00Z', recordsPerPart: 5 });
    stack.simulator.resetRateLimits();
    await app.runner.tick();
    await app.runner.drain({ only: 'parts' });
    const stillOpen = (await tableRows(app.runtime.storage.snapshotsTable)).find(
      (r) => r.rowKey === '2026-11-19T01:01:00Z',
    );
    expect(stillOpen?.status).toBe('copying');
    expect(app.events).toContainEqual(
      expect.objectContaining({
        outcome: 'error',
        reason: expect.stringMatching(/completing it before superseding it failed/),
      }),
    );

    // The queue is back: the next tick completes both.
    deriveQueueDown = false;
    await tickCleanlyAndDrain(app);
    const rows = await tableRows(app.runtime.storage.snapshotsTable);
    expect(rows.map((r) => [r.rowKey, r.status])).toEqual([
      ['2026-11-19T01:01:00Z', 'complete'],
      ['2026-11-19T02:01:00Z', 'complete'],
    ]);
    for (const snapshot of ['2026-11-19T0101Z', '2026-11-19T0201Z']) {
      expect(
        await app.runtime.landing.getBlobClient(curatedManifestPath('browser-extensions', snapshot)).exists(),
      ).toBe(true);
    }
  });
});
