import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MdvmError } from '../../src/core/errors.js';
import { captureOpenTelemetry } from '../helpers/otel.js';
import { createApp, type Stack, startStack, tableRows } from '../helpers/stack.js';

// What Application Insights would receive (spans, metrics, log records) is scanned like everything else.
const openTelemetry = captureOpenTelemetry();

let stack: Stack;
beforeAll(async () => {
  stack = await startStack();
});
afterAll(async () => {
  await stack?.stop();
});

describe('no SAS signature or token leaves the app', () => {
  it('captures every log line, error, table row, telemetry event, span, metric, log record, dead letter and landed blob of a faulty run', async () => {
    let failures = 0;
    const app = await createApp(
      stack,
      { MDVM_EXPORTS: 'software-vulnerabilities,certificates,browser-extensions,security-baselines' },
      {
        wrapCopier: (real) => ({
          copy: async (request) => {
            // A raw SDK-style error that carries the SAS URL in its message, twice, then success.
            if (request.landingPath.includes('_RbacGroupId=31/part-00000') && failures++ < 2) {
              throw new Error(`PUT failed for ${request.sourceUrl} (network reset)`);
            }
            return real.copy(request);
          },
        }),
      },
    );
    for (const id of [
      'software-vulnerabilities',
      'certificates',
      'browser-extensions',
      'security-baselines',
    ] as const) {
      await stack.simulator.publish(id, { generatedTime: '2026-11-17T18:01:00Z', recordsPerPart: 10 });
    }
    stack.simulator.injectFault('software-vulnerabilities', { kind: 'expired-sas', parts: 3 });
    stack.simulator.injectFault('certificates', { kind: 'missing-blob' });
    stack.simulator.injectFault('browser-extensions', { kind: 'status', status: 429, retryAfterSeconds: 1 });
    stack.simulator.injectFault('security-baselines', { kind: 'status', status: 500 });

    const tickErrors: string[] = [];
    for (let round = 0; round < 2; round++) {
      for (const t of await app.runner.tick()) if (t.error) tickErrors.push(t.error);
      // A forged message carrying a signature, and a message with a SAS that is not JSON.
      await app.runtime.queue.sendMessage(
        Buffer.from(`not json https://a.blob.core.windows.net/c/x?sv=1&sig=${'F'.repeat(40)}`).toString('base64'),
      );
      // A forged JSON message whose fields (which become span attributes) carry a signature.
      const forgedSas = `https://a.blob.core.windows.net/c/x?sv=1&sig=${'G'.repeat(40)}`;
      await app.runtime.queue.sendMessage(
        Buffer.from(JSON.stringify({ v: 1, export: forgedSas, snapshot: forgedSas, part: forgedSas })).toString(
          'base64',
        ),
      );
      await app.runner.drain();
    }

    const captured: string[] = [
      ...app.logs.map((l) => l.line),
      ...tickErrors,
      ...app.events.map((e) => JSON.stringify(e)),
      ...(await tableRows(app.runtime.storage.snapshotsTable)).map((r) => JSON.stringify(r)),
      ...(await tableRows(app.runtime.storage.partsTable)).map((r) => JSON.stringify(r)),
    ];
    const exported = await openTelemetry.everything();
    // The faulty paths reached telemetry: a failed copy's span carries the (redacted) error it threw.
    expect(openTelemetry.spans.getFinishedSpans().some((s) => s.status.message?.includes('network reset'))).toBe(true);
    expect(openTelemetry.logRecords.getFinishedLogRecords().length).toBeGreaterThan(20);
    captured.push(exported);
    const poison = await app.runtime.poisonQueue.peekMessages({ numberOfMessages: 32 });
    captured.push(...poison.peekedMessageItems.map((m) => Buffer.from(m.messageText, 'base64').toString()));
    for await (const blob of app.runtime.landing.listBlobsFlat({ includeMetadata: true })) {
      captured.push(blob.name, JSON.stringify(blob.metadata));
      if (blob.name.endsWith('.json')) {
        captured.push((await app.runtime.landing.getBlockBlobClient(blob.name).downloadToBuffer()).toString());
      }
    }

    // Every tick succeeds (429 and 500 are retried); the run really went through the paths that handle URLs and tokens.
    expect(tickErrors).toEqual([]);
    expect(app.events.some((e) => e.outcome === 'expired')).toBe(true);
    expect(app.events.some((e) => e.outcome === 'failed')).toBe(true);
    expect(app.events.some((e) => e.outcome === 'dead-lettered')).toBe(true);
    expect(app.events.some((e) => e.outcome === 'rate-limited')).toBe(true);
    expect(app.logs.some((l) => l.level === 'error' && l.line.includes('network reset'))).toBe(true);
    expect(stack.simulator.issuedSecrets.size).toBeGreaterThan(20);

    const text = captured.join('\n');
    expect(text.length).toBeGreaterThan(10_000);
    for (const secret of stack.simulator.issuedSecrets) expect(text).not.toContain(secret);
    expect(text).not.toMatch(/sig=(?!<redacted>)[A-Za-z0-9%]/);
    expect(text).not.toContain('F'.repeat(40));
    expect(text).not.toContain('G'.repeat(40));
    expect(text).not.toMatch(/Bearer (?!<redacted>)\S/);
  });

  it('errors carry no signature even when built from one', () => {
    const error = new MdvmError(
      'transient',
      'GET https://x.blob.core.windows.net/c/b?se=1&sig=abcdefghijklmnop failed',
    );
    expect(error.message).not.toContain('abcdefghijklmnop');
    expect(String(error)).not.toContain('abcdefghijklmnop');
  });
});
