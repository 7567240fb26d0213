/**
 * Application Insights for the deployed app: the Azure Monitor OpenTelemetry distro receives the spans and metrics
 * core code writes through the OpenTelemetry API (core/observability.ts), with Entra ID ingestion (the identity
 * the Bicep names in APPLICATIONINSIGHTS_AUTHENTICATION_STRING; no instrumentation-key auth). Host-only: the CLI,
 * `npm start` and the tests never load this file.
 */
import { ManagedIdentityCredential } from '@azure/identity';
import { useAzureMonitor } from '@azure/monitor-opentelemetry';
import type { Context } from '@opentelemetry/api';
import type { LogRecordProcessor, SdkLogRecord } from '@opentelemetry/sdk-logs';
import type { ReadableSpan, Span, SpanProcessor } from '@opentelemetry/sdk-trace-base';
import { redact } from '../core/redact.js';

/**
 * Redacts every string an outbound HTTP span can carry (the URL with its SAS, the error message of a failed call)
 * before any exporter sees the span. Registered first, so it runs before the exporter's processor.
 */
export class RedactingSpanProcessor implements SpanProcessor {
  onStart(span: Span, _parentContext: Context): void {
    for (const [key, value] of Object.entries(span.attributes)) {
      if (typeof value === 'string') span.setAttribute(key, redact(value));
    }
  }

  onEnd(span: ReadableSpan): void {
    // Attributes and events added after start (status text, exception events) are redacted in place: the span is
    // ended and immutable through its API, but these are the objects the exporters read next.
    redactInPlace(span.attributes as Record<string, unknown>);
    for (const event of span.events) if (event.attributes) redactInPlace(event.attributes as Record<string, unknown>);
    if (span.status.message) (span.status as { message?: string }).message = redact(span.status.message);
  }

  forceFlush(): Promise<void> {
    return Promise.resolve();
  }

  shutdown(): Promise<void> {
    return Promise.resolve();
  }
}

/**
 * The same gate for log records: the app's own records are redacted when emitted, but the distro also collects log
 * records from instrumented libraries. Runs before the exporter's batch processor.
 */
export class RedactingLogRecordProcessor implements LogRecordProcessor {
  onEmit(logRecord: SdkLogRecord): void {
    if (typeof logRecord.body === 'string') logRecord.setBody(redact(logRecord.body));
    for (const [key, value] of Object.entries(logRecord.attributes)) {
      if (typeof value === 'string') logRecord.setAttribute(key, redact(value));
    }
  }

  forceFlush(): Promise<void> {
    return Promise.resolve();
  }

  shutdown(): Promise<void> {
    return Promise.resolve();
  }
}

function redactInPlace(attributes: Record<string, unknown>): void {
  for (const [key, value] of Object.entries(attributes)) {
    if (typeof value === 'string') attributes[key] = redact(value);
  }
}

/** Starts the distro when the app has an Application Insights connection string; returns whether it did. */
export function useAzureMonitorWhenConfigured(env: NodeJS.ProcessEnv = process.env): boolean {
  const connectionString = env.APPLICATIONINSIGHTS_CONNECTION_STRING;
  if (!connectionString) return false;
  const clientId = /(?:^|;)ClientId=([^;]+)/i.exec(env.APPLICATIONINSIGHTS_AUTHENTICATION_STRING ?? '')?.[1];
  useAzureMonitor({
    azureMonitorExporterOptions: {
      connectionString,
      credential: new ManagedIdentityCredential(clientId ? { clientId } : {}),
    },
    spanProcessors: [new RedactingSpanProcessor()],
    logRecordProcessors: [new RedactingLogRecordProcessor()],
    enableLiveMetrics: false,
  });
  return true;
}
