import { describe, expect, it } from 'vitest';
import { CallBudget } from '../../src/core/callBudget.js';
import { parseRetryAfter } from '../../src/core/defenderClient.js';
import { classifyStorageError, MdvmError } from '../../src/core/errors.js';
import { encodeMessage, parsePartMessage } from '../../src/core/messages.js';
import { redact } from '../../src/core/redact.js';

describe('redact', () => {
  it('removes SAS queries, signatures, bearer tokens and account keys', () => {
    const text = [
      'copy https://acct.blob.core.windows.net/c/p/part.json.gz?sv=2020&se=x&sig=AbC%2Bdef%3D failed',
      'header Authorization: Bearer eyJ0eXAiOi.JKV1Qi.abc-_=',
      'conn AccountKey=c2VjcmV0a2V5;EndpointSuffix=core',
      'raw sig=QUJDREVGRw== and "access_token":"tok-123"',
    ].join('\n');
    const out = redact(text);
    for (const secret of ['AbC%2Bdef%3D', 'eyJ0eXAiOi', 'c2VjcmV0a2V5', 'QUJDREVGRw==', 'tok-123']) {
      expect(out).not.toContain(secret);
    }
    expect(out).toContain('https://acct.blob.core.windows.net/c/p/part.json.gz?<redacted>');
  });

  it('removes a password written into a URL and a URL-encoded signature', () => {
    const out = redact(
      'GET https://mdvmadmin:Sup3rS3cretPassw0rd@acct.blob.core.windows.net/ failed; ' +
        'next=https%3A%2F%2Fh%2Fp%3Fsv%3D1%26sig%3DAbCdEfEnc0ded%252B%26se%3D2 done',
    );
    expect(out).not.toContain('Sup3rS3cretPassw0rd');
    expect(out).not.toContain('AbCdEfEnc0ded');
    expect(out).toContain('https://<redacted>@acct.blob.core.windows.net/');
    expect(out).toContain('%26se%3D2 done');
    // However long: a token used as the password too.
    const token = 'T'.repeat(300);
    expect(redact(`https://u:${token}@acct.blob.core.windows.net/`)).not.toContain(token);
  });

  it('errors redact their own message', () => {
    expect(new MdvmError('fatal', 'GET https://h/x?sig=SECRET1 failed').message).not.toContain('SECRET1');
  });
});

describe('error classification', () => {
  it.each([
    [{ statusCode: 404, code: 'BlobNotFound' }, 'not-found'],
    [{ statusCode: 403, code: 'AuthenticationFailed' }, 'expired'],
    [{ statusCode: 403, code: 'CannotVerifyCopySource' }, 'expired'],
    [{ statusCode: 403, code: 'AuthorizationPermissionMismatch' }, 'forbidden'],
    [{ statusCode: 503, code: 'ServerBusy' }, 'transient'],
    [{ statusCode: 500 }, 'transient'],
    [{ code: 'ECONNRESET' }, 'transient'],
    [{ statusCode: 400, code: 'InvalidHeaderValue' }, 'fatal'],
  ])('%o is %s', (error, kind) => {
    expect(classifyStorageError(error, 'op').kind).toBe(kind);
  });
});

describe('queue messages', () => {
  const valid = {
    v: 1,
    export: 'certificates',
    snapshot: '2026-11-22T1801Z',
    generatedTime: '2026-11-22T18:01:00Z',
    part: 'OrgId=o/_RbacGroupId=1/part-00000-j.c000.json.gz',
    sourceUrl: 'https://a.blob.core.windows.net/c/x',
    sasExpiresOn: null,
    enqueuedAt: '2026-11-22T18:30:00Z',
  };

  it('round-trips through base64 JSON', () => {
    const wire = encodeMessage(valid as Parameters<typeof encodeMessage>[0]);
    expect(parsePartMessage(Buffer.from(wire, 'base64').toString('utf8'))).toEqual(valid);
    expect(parsePartMessage(valid)).toEqual(valid);
  });

  it.each([
    ['not json', /not JSON/],
    [{ ...valid, v: 2 }, /v:/],
    [{ ...valid, export: 'everything' }, /export/],
    [{ ...valid, snapshot: '../../x' }, /snapshot/],
    [{ ...valid, sourceUrl: undefined }, /sourceUrl/],
  ])('refuses %o with a reason', (input, reason) => {
    expect(() => parsePartMessage(input)).toThrow(reason);
  });
});

describe('call budget', () => {
  it('allows 5 calls a minute and 20 an hour per endpoint', () => {
    let now = 0;
    const budget = new CallBudget(undefined, () => now);
    for (let i = 0; i < 5; i++) {
      expect(budget.waitInMs('a')).toBe(0);
      budget.record('a');
    }
    expect(budget.waitInMs('a')).toBe(60_000);
    expect(budget.waitInMs('b')).toBe(0);
    for (let minute = 1; minute < 4; minute++) {
      now = minute * 60_000;
      for (let i = 0; i < 5; i++) budget.record('a');
    }
    now = 4 * 60_000;
    expect(budget.waitInMs('a')).toBe(3_600_000 - 4 * 60_000);
  });

  it('reads Retry-After as seconds or a date', () => {
    expect(parseRetryAfter('7')).toBe(7000);
    expect(parseRetryAfter(new Date(10_000).toUTCString(), 4_000)).toBe(6000);
    expect(parseRetryAfter(undefined)).toBeUndefined();
    expect(parseRetryAfter(' 5 ')).toBe(5000);
    expect(parseRetryAfter('1.5')).toBe(1500);
    // Date.parse reads these as dates decades ago, which would mean "retry at once": unknown instead (the caller's
    // default wait).
    expect(parseRetryAfter('-5')).toBeUndefined();
    expect(parseRetryAfter('1.5.')).toBeUndefined();
    expect(parseRetryAfter('soon')).toBeUndefined();
  });
});

describe('RedactingSpanProcessor (outbound HTTP spans in Application Insights)', () => {
  it('removes the SAS from URL attributes, exception events and the status before the exporter sees the span', async () => {
    const { BasicTracerProvider, InMemorySpanExporter, SimpleSpanProcessor } = await import(
      '@opentelemetry/sdk-trace-base'
    );
    const { RedactingSpanProcessor } = await import('../../src/functions/azureMonitor.js');
    const exporter = new InMemorySpanExporter();
    const provider = new BasicTracerProvider({
      spanProcessors: [new RedactingSpanProcessor(), new SimpleSpanProcessor(exporter)],
    });
    const sas =
      'sv=2024-08-04&se=2026-11-24T06%3A00%3A00Z&sr=b&sp=r&sig=FAKEtestSignatureNotARealKey0123456789%2BAbC%3D';
    const url = `https://acct.blob.core.windows.net/c/2026-11-24/0001/VaExport/json/part-0.json.gz?${sas}`;
    const span = provider
      .getTracer('t')
      .startSpan('GET', { attributes: { 'url.full': url, 'http.request.method': 'GET' } });
    span.recordException(new Error(`request to ${url} failed`));
    span.setAttribute('http.url', url);
    span.setStatus({ code: 2, message: `GET ${url}: 403` });
    span.end();
    const [exported] = exporter.getFinishedSpans();
    const text = JSON.stringify({ a: exported?.attributes, e: exported?.events, s: exported?.status });
    expect(text).toContain('acct.blob.core.windows.net/c/2026-11-24/0001/VaExport/json/part-0.json.gz');
    expect(text).not.toContain('FAKEtestSignatureNotARealKey');
    expect(text).not.toMatch(/sig=/);
    expect(exported?.attributes['http.request.method']).toBe('GET');
  });
});

describe('RedactingLogRecordProcessor (log records in Application Insights)', () => {
  it('removes the SAS from the body and every attribute before the exporter sees the record', async () => {
    const { InMemoryLogRecordExporter, LoggerProvider, SimpleLogRecordProcessor } = await import(
      '@opentelemetry/sdk-logs'
    );
    const { RedactingLogRecordProcessor } = await import('../../src/functions/azureMonitor.js');
    const exporter = new InMemoryLogRecordExporter();
    const provider = new LoggerProvider({
      processors: [new RedactingLogRecordProcessor(), new SimpleLogRecordProcessor({ exporter })],
    });
    const url =
      'https://acct.blob.core.windows.net/c/part-0.json.gz?sv=2024-08-04&sr=b&sp=r&sig=FAKEtestSignatureNotARealKey0123456789%2BAbC%3D';
    provider.getLogger('instrumented-library').emit({
      body: `fetched ${url}`,
      attributes: { 'url.full': url, authorization: 'Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl', n: 3 },
    });
    const [exported] = exporter.getFinishedLogRecords();
    const text = JSON.stringify({ b: exported?.body, a: exported?.attributes });
    expect(text).toContain('acct.blob.core.windows.net/c/part-0.json.gz');
    expect(text).not.toContain('FAKEtestSignatureNotARealKey');
    expect(text).not.toContain('c2lnbmF0dXJl');
    expect(exported?.attributes.n).toBe(3);
  });
});
