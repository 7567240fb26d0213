import { metrics, trace } from '@opentelemetry/api';
import { logs } from '@opentelemetry/api-logs';
import { InMemoryLogRecordExporter, LoggerProvider, SimpleLogRecordProcessor } from '@opentelemetry/sdk-logs';
import {
  AggregationTemporality,
  InMemoryMetricExporter,
  MeterProvider,
  PeriodicExportingMetricReader,
} from '@opentelemetry/sdk-metrics';
import { BasicTracerProvider, InMemorySpanExporter, SimpleSpanProcessor } from '@opentelemetry/sdk-trace-base';

export interface MetricPoint {
  attributes: Record<string, unknown>;
  value: unknown;
}

/**
 * In-memory OpenTelemetry providers registered as this process's globals (a vitest file's worker, or the chaos
 * suite): what the Azure Monitor distro would export, kept for assertions and the secret scan.
 */
export function captureOpenTelemetry() {
  const spans = new InMemorySpanExporter();
  trace.setGlobalTracerProvider(new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(spans)] }));
  const metricExporter = new InMemoryMetricExporter(AggregationTemporality.CUMULATIVE);
  const reader = new PeriodicExportingMetricReader({ exporter: metricExporter, exportIntervalMillis: 3_600_000 });
  metrics.setGlobalMeterProvider(new MeterProvider({ readers: [reader] }));
  const logRecords = new InMemoryLogRecordExporter();
  logs.setGlobalLoggerProvider(
    new LoggerProvider({ processors: [new SimpleLogRecordProcessor({ exporter: logRecords })] }),
  );

  /** The latest cumulative points of every metric, by name. */
  async function metricPoints(): Promise<Map<string, MetricPoint[]>> {
    await reader.forceFlush();
    const points = new Map<string, MetricPoint[]>();
    for (const batch of metricExporter.getMetrics()) {
      for (const scope of batch.scopeMetrics) {
        for (const metric of scope.metrics) {
          points.set(
            metric.descriptor.name,
            metric.dataPoints.map((p) => ({ attributes: p.attributes as Record<string, unknown>, value: p.value })),
          );
        }
      }
    }
    return points;
  }

  /** Everything exported so far as text: span names, attributes, events, links and status; metrics; log records. */
  async function everything(): Promise<string> {
    return JSON.stringify([
      spans.getFinishedSpans().map((s) => ({
        name: s.name,
        attributes: s.attributes,
        events: s.events,
        links: s.links,
        status: s.status,
      })),
      [...(await metricPoints()).entries()],
      logRecords.getFinishedLogRecords().map((r) => ({ body: r.body, attributes: r.attributes })),
    ]);
  }

  function reset(): void {
    spans.reset();
    logRecords.reset();
  }

  return { spans, logRecords, metricPoints, everything, reset };
}
