import {
  type Attributes,
  type Context,
  context,
  type Link,
  type Meter,
  type MeterProvider,
  metrics,
  type Span,
  SpanKind,
  SpanStatusCode,
  trace,
} from '@opentelemetry/api';
import { logs, SeverityNumber } from '@opentelemetry/api-logs';
import { redact } from './redact.js';

/**
 * Traces, metrics and log records through the OpenTelemetry API. Whatever provider the process registers receives them (the
 * Azure Monitor distro in Azure, an in-memory exporter in tests); with none registered every call is a no-op.
 * Names are fixed: dashboards, alerts and the workbook query them.
 */
export const INSTRUMENTATION_NAME = 'mdvm-ingest';

export const SPAN_NAMES = { tick: 'mdvm.tick', copy: 'mdvm.copy', complete: 'mdvm.complete' } as const;

export const METRIC_NAMES = {
  /** Counter of part outcomes (landed, duplicate, expired, failed, superseded, dead-lettered); export, outcome. */
  partOutcomes: 'mdvm.part.outcomes',
  /** Counter of bytes landed; export. */
  bytesLanded: 'mdvm.bytes.landed',
  /** Histogram of copy durations in ms; export, outcome, method. */
  copyDuration: 'mdvm.copy.duration',
  /** Histogram of seconds from generatedTime to completion; export. */
  snapshotLag: 'mdvm.snapshot.lag',
  /** Counter of Defender API calls by answer (ok, 429, 401-403, 5xx, other); export, status. */
  defenderCalls: 'mdvm.defender.calls',
  /** Counter of failures by error class (the MdvmError kind); export, class. */
  failures: 'mdvm.failures',
} as const;

/** The attribute names metrics are split by (AppMetrics `Properties` in Application Insights). */
export const METRIC_DIMENSIONS = ['export', 'outcome', 'method', 'status', 'class'] as const;

interface Instruments {
  partOutcomes: ReturnType<Meter['createCounter']>;
  bytesLanded: ReturnType<Meter['createCounter']>;
  copyDuration: ReturnType<Meter['createHistogram']>;
  snapshotLag: ReturnType<Meter['createHistogram']>;
  defenderCalls: ReturnType<Meter['createCounter']>;
  failures: ReturnType<Meter['createCounter']>;
}

// Instruments from the no-op meter stay no-ops: they are created per registered provider, on first use.
const instrumentsByProvider = new WeakMap<MeterProvider, Instruments>();

function instruments(): Instruments {
  const provider = metrics.getMeterProvider();
  let found = instrumentsByProvider.get(provider);
  if (!found) {
    const meter = provider.getMeter(INSTRUMENTATION_NAME);
    found = {
      partOutcomes: meter.createCounter(METRIC_NAMES.partOutcomes, { description: 'part outcomes' }),
      bytesLanded: meter.createCounter(METRIC_NAMES.bytesLanded, { description: 'bytes landed', unit: 'By' }),
      copyDuration: meter.createHistogram(METRIC_NAMES.copyDuration, { description: 'copy duration', unit: 'ms' }),
      snapshotLag: meter.createHistogram(METRIC_NAMES.snapshotLag, {
        description: 'completion time minus generatedTime',
        unit: 's',
      }),
      defenderCalls: meter.createCounter(METRIC_NAMES.defenderCalls, { description: 'Defender API calls' }),
      failures: meter.createCounter(METRIC_NAMES.failures, { description: 'failures by error class' }),
    };
    instrumentsByProvider.set(provider, found);
  }
  return found;
}

/** Every string attribute passes the same redaction as log lines: no SAS or token reaches a span or metric. */
function clean(attributes: Attributes): Attributes {
  const out: Attributes = {};
  for (const [key, value] of Object.entries(attributes)) {
    if (value !== undefined) out[key] = typeof value === 'string' ? redact(value) : value;
  }
  return out;
}

export const record = {
  partOutcome(exportId: string, outcome: string): void {
    instruments().partOutcomes.add(1, clean({ export: exportId, outcome }));
  },
  landed(exportId: string, bytes: number, durationMs: number, method: string): void {
    instruments().bytesLanded.add(bytes, clean({ export: exportId }));
    instruments().copyDuration.record(durationMs, clean({ export: exportId, outcome: 'landed', method }));
  },
  snapshotLag(exportId: string, seconds: number): void {
    instruments().snapshotLag.record(seconds, clean({ export: exportId }));
  },
  defenderCall(exportId: string, statusCode: number | undefined): void {
    const status =
      statusCode === 200
        ? 'ok'
        : statusCode === 429
          ? '429'
          : statusCode === 401 || statusCode === 403
            ? '401-403'
            : statusCode !== undefined && statusCode >= 500
              ? '5xx'
              : 'other';
    instruments().defenderCalls.add(1, clean({ export: exportId, status }));
  },
  failure(exportId: string | undefined, errorClass: string): void {
    instruments().failures.add(1, clean({ export: exportId ?? 'none', class: errorClass }));
  },
};

/**
 * One structured log record per telemetry event, through the provider the process registers (the distro in Azure:
 * AppTraces with the event's properties as columns of `Properties`). The body is the same `mdvm.<event> {json}` line
 * the logger writes; every string is redacted, as for spans.
 */
export function emitLogRecord(body: string, attributes: Attributes, level: 'info' | 'warn'): void {
  logs.getLogger(INSTRUMENTATION_NAME).emit({
    body: redact(body),
    severityNumber: level === 'warn' ? SeverityNumber.WARN : SeverityNumber.INFO,
    severityText: level === 'warn' ? 'WARN' : 'INFO',
    attributes: clean(attributes),
  });
}

/** W3C `traceparent` of a span, carried in queue messages so a copy links back to the tick that enqueued it. */
export function traceparentOf(span: Span): string | undefined {
  const c = span.spanContext();
  if (!trace.isSpanContextValid(c)) return undefined;
  return `00-${c.traceId}-${c.spanId}-${c.traceFlags.toString(16).padStart(2, '0')}`;
}

/** The link to the span a `traceparent` names, when it is well formed. */
export function linkFrom(traceparent: string | undefined): Link[] {
  const match = /^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$/.exec(traceparent ?? '');
  if (!match) return [];
  const spanContext = {
    traceId: match[1] ?? '',
    spanId: match[2] ?? '',
    traceFlags: Number.parseInt(match[3] ?? '0', 16),
    isRemote: true,
  };
  return trace.isSpanContextValid(spanContext) ? [{ context: spanContext }] : [];
}

/**
 * Run `work` inside a span: ended when `work` settles, status error (with the redacted message) when it throws.
 * `parent` makes it a child explicitly (no context manager is assumed); `links` relate it to other traces.
 */
export async function inSpan<T>(
  name: string,
  attributes: Attributes,
  work: (span: Span, spanContext: Context) => Promise<T>,
  options: { parent?: Context; links?: Link[]; kind?: SpanKind } = {},
): Promise<T> {
  const tracer = trace.getTracer(INSTRUMENTATION_NAME);
  const span = tracer.startSpan(
    name,
    {
      attributes: clean(attributes),
      ...(options.links ? { links: options.links } : {}),
      ...(options.kind !== undefined ? { kind: options.kind } : {}),
    },
    options.parent ?? context.active(),
  );
  try {
    const result = await work(span, trace.setSpan(options.parent ?? context.active(), span));
    return result;
  } catch (error) {
    span.setStatus({ code: SpanStatusCode.ERROR, message: redact((error as Error).message ?? String(error)) });
    throw error;
  } finally {
    span.end();
  }
}

/**
 * One outbound HTTP call as a CLIENT span with the semantic-convention attributes Application Insights turns into an
 * HTTP dependency. The URL is recorded without its query string: a SAS or token never reaches the span.
 */
export async function inHttpSpan<T extends { statusCode: number }>(
  method: string,
  url: URL,
  attributes: Attributes,
  call: () => Promise<T>,
): Promise<T> {
  return inSpan(
    `${method} ${url.pathname}`,
    {
      ...attributes,
      'http.request.method': method,
      'url.full': `${url.origin}${url.pathname}`,
      'server.address': url.hostname,
    },
    async (span) => {
      const response = await call();
      span.setAttribute('http.response.status_code', response.statusCode);
      if (response.statusCode >= 400)
        span.setStatus({ code: SpanStatusCode.ERROR, message: String(response.statusCode) });
      return response;
    },
    { kind: SpanKind.CLIENT },
  );
}

/** Set attributes on a span through the same redaction. */
export function annotate(span: Span, attributes: Attributes): void {
  span.setAttributes(clean(attributes));
}
