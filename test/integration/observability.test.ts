import { SpanKind, SpanStatusCode } from '@opentelemetry/api';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { SnapshotManifest } from '../../src/core/completion.js';
import { MAX_DEQUEUE_COUNT } from '../../src/core/landPart.js';
import { METRIC_NAMES, SPAN_NAMES } from '../../src/core/observability.js';
import { renderTraceSummary } from '../../src/local/localTelemetry.js';
import { captureOpenTelemetry } from '../helpers/otel.js';
import { createApp, type Stack, startStack, tableRows } from '../helpers/stack.js';

// This file's worker has its own OpenTelemetry globals: in-memory exporters for spans, metrics and log records.
const { spans, logRecords, metricPoints, everything: everythingExported } = captureOpenTelemetry();

let stack: Stack;
beforeAll(async () => {
  stack = await startStack();
});
afterAll(async () => {
  await stack?.stop();
});

describe('OpenTelemetry: spans, metrics and log records of a run', () => {
  it('one tick span per export, one copy span per part linked to its tick, metrics and log records equal to the manifests, no secret anywhere', async () => {
    const exportsRun = ['certificates', 'browser-extensions'] as const;
    const app = await createApp(stack, { MDVM_EXPORTS: exportsRun.join(',') }, { workers: 8 });
    for (const id of exportsRun) {
      await stack.simulator.publish(id, { generatedTime: '2026-11-16T06:01:00Z', recordsPerPart: 10 });
    }
    stack.simulator.injectFault('certificates', { kind: 'status', status: 429, retryAfterSeconds: 1 });
    await app.runner.tick();
    await app.runner.drain();

    const finished = spans.getFinishedSpans();
    const ticks = finished.filter((s) => s.name === SPAN_NAMES.tick);
    expect(ticks.map((s) => s.attributes.export).sort()).toEqual([...exportsRun].sort());
    const copies = finished.filter((s) => s.name === SPAN_NAMES.copy);
    const parts = await tableRows(app.runtime.storage.partsTable);
    expect(copies).toHaveLength(parts.length);
    for (const copy of copies) {
      const tick = ticks.find((t) => t.attributes.export === copy.attributes.export);
      expect(copy.links.map((l) => l.context.spanId)).toEqual([tick?.spanContext().spanId]);
      expect(copy.links[0]?.context.traceId).toBe(tick?.spanContext().traceId);
      expect(copy.attributes).toMatchObject({ outcome: 'landed', method: 'copy-from-url', attempt: 1 });
    }
    // Each Defender API call is an HTTP CLIENT span (an HTTP dependency in Application Insights), URL without query.
    const httpCalls = finished.filter((s) => s.kind === SpanKind.CLIENT && s.attributes.export === 'certificates');
    expect(httpCalls.map((s) => s.attributes['http.response.status_code'])).toEqual([429, 200]);
    for (const call of httpCalls) {
      expect(call.attributes).toMatchObject({ 'http.request.method': 'GET', 'server.address': '127.0.0.1' });
      expect(String(call.attributes['url.full'])).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/api\/[^?]+$/);
    }
    expect(httpCalls[0]?.status.code).toBe(SpanStatusCode.ERROR);
    const completions = finished.filter((s) => s.name === SPAN_NAMES.complete && s.attributes.outcome === 'complete');
    // Every export's snapshot has a completion span that found it complete (a later check may find it complete too).
    expect([...new Set(completions.map((s) => s.attributes.export))].sort()).toEqual([...exportsRun].sort());

    const points = await metricPoints();
    for (const id of exportsRun) {
      const manifest = JSON.parse(
        (
          await app.runtime.landing.getBlobClient(`${id}/snapshot=2026-11-16T0601Z/_manifest.json`).downloadToBuffer()
        ).toString(),
      ) as SnapshotManifest;
      const landed = points
        .get(METRIC_NAMES.partOutcomes)
        ?.find((p) => p.attributes.export === id && p.attributes.outcome === 'landed');
      expect(landed?.value).toBe(manifest.totals.parts);
      const bytes = points.get(METRIC_NAMES.bytesLanded)?.find((p) => p.attributes.export === id);
      expect(bytes?.value).toBe(manifest.totals.bytes);
      const lag = points.get(METRIC_NAMES.snapshotLag)?.find((p) => p.attributes.export === id);
      expect((lag?.value as { count: number } | undefined)?.count).toBe(1);
      const durations = points.get(METRIC_NAMES.copyDuration)?.find((p) => p.attributes.export === id);
      expect((durations?.value as { count: number } | undefined)?.count).toBe(manifest.totals.parts);

      // Log records carry the telemetry properties as attributes (AppTraces Properties in Application Insights).
      const records = logRecords.getFinishedLogRecords().map((r) => r.attributes);
      const landedRecords = records.filter((a) => a.event === 'part' && a.export === id && a.outcome === 'landed');
      expect(landedRecords).toHaveLength(manifest.totals.parts);
      expect(landedRecords.reduce((sum, a) => sum + Number(a.bytes), 0)).toBe(manifest.totals.bytes);
      expect(records).toContainEqual(
        expect.objectContaining({ event: 'snapshot', export: id, snapshot: '2026-11-16T0601Z', outcome: 'completed' }),
      );
    }
    const rateLimited = logRecords
      .getFinishedLogRecords()
      .filter((r) => r.attributes.event === 'defender-retry' && r.attributes.export === 'certificates');
    expect(rateLimited.length).toBeGreaterThan(0);
    expect(rateLimited[0]?.body).toMatch(/^mdvm\.defender-retry \{/);
    const calls = points.get(METRIC_NAMES.defenderCalls) ?? [];
    expect(calls).toEqual(
      expect.arrayContaining([
        { attributes: { export: 'certificates', status: '429' }, value: 1 },
        { attributes: { export: 'certificates', status: 'ok' }, value: 1 },
        { attributes: { export: 'browser-extensions', status: 'ok' }, value: 1 },
      ]),
    );

    // The local summary (npm start -- --otel) groups the copies under the tick they link to.
    const summary = renderTraceSummary(finished, new Map());
    for (const id of exportsRun) {
      const count = copies.filter((c) => c.attributes.export === id).length;
      expect(summary).toMatch(
        new RegExp(
          `${id} 2026-11-16T0601Z: tick \\d+ ms \\(enqueued, ${count} enqueued\\) → ${count} copies linked \\(${count} landed`,
        ),
      );
    }

    // No SAS signature or token in any span (name, attributes, events, links, status), metric point or log record.
    const everything = await everythingExported();
    expect(stack.simulator.issuedSecrets.size).toBeGreaterThan(10);
    for (const secret of stack.simulator.issuedSecrets) expect(everything).not.toContain(secret);
    expect(everything).not.toMatch(/sig=/);
  });

  it('a message without trace context (enqueued by an older version) still lands, as a span with no link', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'hardware-firmware' });
    await stack.simulator.publish('hardware-firmware', { generatedTime: '2026-11-16T07:01:00Z', recordsPerPart: 5 });
    spans.reset();
    await app.runner.tick();
    const texts: string[] = [];
    for (;;) {
      const batch = await app.runtime.queue.receiveMessages({ numberOfMessages: 32, visibilityTimeout: 60 });
      if (batch.receivedMessageItems.length === 0) break;
      for (const m of batch.receivedMessageItems) {
        texts.push(m.messageText);
        await app.runtime.queue.deleteMessage(m.messageId, m.popReceipt);
      }
    }
    for (const text of texts) {
      const { traceparent, ...old } = JSON.parse(Buffer.from(text, 'base64').toString()) as Record<string, unknown>;
      expect(traceparent).toMatch(/^00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]$/);
      await app.runtime.queue.sendMessage(Buffer.from(JSON.stringify(old)).toString('base64'));
    }
    await app.runner.drain();
    const copies = spans.getFinishedSpans().filter((s) => s.name === SPAN_NAMES.copy);
    expect(copies).toHaveLength(texts.length);
    expect(copies.every((s) => s.links.length === 0 && s.attributes.outcome === 'landed')).toBe(true);
    expect((await tableRows(app.runtime.storage.snapshotsTable))[0]).toMatchObject({ status: 'complete' });
  });

  it('a part given up on after its last delivery counts as dead-lettered, and each failed delivery by its class', async () => {
    let doomed: string | undefined;
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'security-baselines' },
      {
        workers: 2,
        wrapCopier: (real) => ({
          copy: async (request) => {
            doomed ??= request.landingPath;
            if (request.landingPath === doomed) throw new Error('connection reset while copying');
            return real.copy(request);
          },
        }),
      },
    );
    await stack.simulator.publish('security-baselines', { generatedTime: '2026-11-16T08:01:00Z', recordsPerPart: 5 });
    await app.runner.tick();
    await app.runner.drain();

    const poisoned = await app.runtime.poisonQueue.peekMessages({ numberOfMessages: 32 });
    expect(poisoned.peekedMessageItems).toHaveLength(1);
    const points = await metricPoints();
    const outcome = (name: string) =>
      points
        .get(METRIC_NAMES.partOutcomes)
        ?.find((p) => p.attributes.export === 'security-baselines' && p.attributes.outcome === name)?.value;
    expect(outcome('dead-lettered')).toBe(1);
    const parts = await tableRows(app.runtime.storage.partsTable);
    const baselineParts = parts.filter((p) => String(p.partitionKey).startsWith('security-baselines'));
    expect(outcome('landed')).toBe(baselineParts.length - 1);
    const transient = points
      .get(METRIC_NAMES.failures)
      ?.find((p) => p.attributes.export === 'security-baselines' && p.attributes.class === 'transient');
    expect(transient?.value).toBe(MAX_DEQUEUE_COUNT);
    const doomedSpans = spans
      .getFinishedSpans()
      .filter((s) => s.name === SPAN_NAMES.copy && s.attributes.export === 'security-baselines')
      .filter((s) => s.attributes.outcome === 'retry' || s.attributes.outcome === 'dead-lettered');
    expect(doomedSpans.map((s) => s.attributes.outcome)).toEqual([
      ...Array(MAX_DEQUEUE_COUNT - 1).fill('retry'),
      'dead-lettered',
    ]);
  });

  it('the tick span counts what Defender offered: enqueued, already expired, refused', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'hardware-firmware' });
    const snap = await stack.simulator.publish('hardware-firmware', {
      generatedTime: '2026-11-16T09:01:00Z',
      recordsPerPart: 5,
    });
    stack.simulator.injectFault('hardware-firmware', { kind: 'expired-sas', parts: 2 });
    spans.reset();
    await app.runner.tick();
    const [tick] = spans.getFinishedSpans().filter((s) => s.name === SPAN_NAMES.tick);
    expect(snap.parts.length).toBeGreaterThan(2);
    expect(tick?.attributes).toMatchObject({
      export: 'hardware-firmware',
      snapshot: '2026-11-16T0901Z',
      'parts.offered': snap.parts.length,
      'parts.enqueued': snap.parts.length - 2,
      'parts.expired': 2,
      'parts.refused': 0,
    });
  });
});
