/**
 * `npm start -- --otel`: the app's OpenTelemetry spans and metrics kept in memory and summarised per snapshot, to
 * show what Application Insights receives without Azure. Local only (the SDK packages are dev dependencies; the
 * deployment package never loads this file).
 */
import { metrics, trace } from '@opentelemetry/api';
import {
  AggregationTemporality,
  InMemoryMetricExporter,
  MeterProvider,
  PeriodicExportingMetricReader,
} from '@opentelemetry/sdk-metrics';
import {
  BasicTracerProvider,
  InMemorySpanExporter,
  type ReadableSpan,
  SimpleSpanProcessor,
} from '@opentelemetry/sdk-trace-base';
import { METRIC_NAMES, SPAN_NAMES } from '../core/observability.js';

export interface LocalTelemetry {
  /** One block per tick: its copies (linked by trace context), their outcomes and time, and the metrics. */
  summary(): Promise<string>;
}

export function startLocalTelemetry(): LocalTelemetry {
  const spans = new InMemorySpanExporter();
  trace.setGlobalTracerProvider(new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(spans)] }));
  const exporter = new InMemoryMetricExporter(AggregationTemporality.CUMULATIVE);
  const reader = new PeriodicExportingMetricReader({ exporter, exportIntervalMillis: 3_600_000 });
  metrics.setGlobalMeterProvider(new MeterProvider({ readers: [reader] }));
  return {
    async summary() {
      await reader.forceFlush();
      const sums = new Map<string, number>();
      for (const batch of exporter.getMetrics()) {
        for (const scope of batch.scopeMetrics) {
          for (const metric of scope.metrics) {
            for (const point of metric.dataPoints) {
              const key = `${metric.descriptor.name}|${String(point.attributes.export ?? '')}`;
              const value = typeof point.value === 'number' ? point.value : (point.value as { sum?: number }).sum;
              sums.set(key, value ?? 0);
            }
          }
        }
      }
      return renderTraceSummary(spans.getFinishedSpans(), sums);
    },
  };
}

const ms = (span: ReadableSpan) => span.duration[0] * 1000 + span.duration[1] / 1e6;

/** The per-snapshot view of finished spans and metric sums (`<metric>|<export>` → value). */
export function renderTraceSummary(spans: readonly ReadableSpan[], sums: ReadonlyMap<string, number>): string {
  const lines = ['OpenTelemetry (what Application Insights would receive):'];
  const ticks = spans.filter((s) => s.name === SPAN_NAMES.tick);
  for (const tick of ticks) {
    const id = tick.spanContext().spanId;
    const copies = spans.filter((s) => s.name === SPAN_NAMES.copy && s.links.some((l) => l.context.spanId === id));
    const outcomes = new Map<string, number>();
    for (const c of copies)
      outcomes.set(String(c.attributes.outcome), (outcomes.get(String(c.attributes.outcome)) ?? 0) + 1);
    const exportId = String(tick.attributes.export);
    const copyMs = copies.map(ms).sort((a, b) => a - b);
    const median = copyMs[Math.floor(copyMs.length / 2)] ?? 0;
    lines.push(
      `  trace ${tick.spanContext().traceId.slice(0, 8)} ${exportId} ${String(tick.attributes.snapshot ?? '')}: ` +
        `tick ${ms(tick).toFixed(0)} ms (${String(tick.attributes.outcome ?? 'error')}, ${String(tick.attributes['parts.enqueued'] ?? 0)} enqueued)` +
        ` → ${copies.length} copies linked (${[...outcomes].map(([k, v]) => `${v} ${k}`).join(', ') || 'none'}, median ${median.toFixed(0)} ms)`,
    );
    const landed = sums.get(`${METRIC_NAMES.bytesLanded}|${exportId}`);
    const lag = sums.get(`${METRIC_NAMES.snapshotLag}|${exportId}`);
    if (copies.length > 0 && landed !== undefined) {
      lines.push(
        `      ${METRIC_NAMES.bytesLanded} ${landed}${lag === undefined ? '' : `, ${METRIC_NAMES.snapshotLag} ${lag.toFixed(0)} s`}`,
      );
    }
  }
  if (ticks.length === 0) lines.push('  no tick spans');
  return lines.join('\n');
}
