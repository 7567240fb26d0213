import { emitLogRecord } from './observability.js';
import { redact } from './redact.js';

/** Where log lines go: the InvocationContext in Functions, the terminal or a test's array locally. */
export interface Logger {
  info(message: string): void;
  warn(message: string): void;
  error(message: string): void;
}

export type Outcome =
  | 'enqueued'
  | 'unchanged'
  | 'empty'
  | 'refused'
  | 'resumed'
  | 'landed'
  | 'duplicate'
  | 'expired'
  | 'failed'
  | 'dead-lettered'
  | 'superseded'
  | 'completed'
  | 'retry'
  | 'rate-limited'
  | 'error';

/** The one set of property names every event uses, so queries in Application Insights stay simple. */
export interface TelemetryProperties {
  export?: string;
  snapshot?: string;
  part?: string;
  bytes?: number;
  records?: number;
  durationMs?: number;
  outcome: Outcome;
  method?: string;
  reason?: string;
}

const WARNING_OUTCOMES: ReadonlySet<Outcome> = new Set(['failed', 'error', 'dead-lettered', 'refused']);

/** The events the app writes; alert and workbook queries filter on these names. */
/** `derived`: a curated part or change set written (method `curated` or `changes`). */
export const TELEMETRY_EVENTS = ['request', 'part', 'snapshot', 'defender-retry', 'derived'] as const;
export type TelemetryEventName = (typeof TELEMETRY_EVENTS)[number];

export interface TelemetryEvent extends TelemetryProperties {
  event: TelemetryEventName;
}

/** Every property name an event can carry (AppTraces `Properties` in Application Insights). */
export const TELEMETRY_PROPERTY_NAMES = [
  'event',
  'export',
  'snapshot',
  'part',
  'bytes',
  'records',
  'durationMs',
  'outcome',
  'method',
  'reason',
] as const satisfies readonly (keyof TelemetryEvent)[];
// Fails to compile when TelemetryEvent gains a property the list above does not name.
const everyPropertyNamed: Record<Exclude<keyof TelemetryEvent, (typeof TELEMETRY_PROPERTY_NAMES)[number]>, never> = {};
void everyPropertyNamed;

/**
 * One helper for every event: a single structured line `mdvm.<event> {json}` through the logger, and the same
 * event as an OpenTelemetry log record whose attributes are these property names (AppTraces `Properties` in
 * Application Insights). Every string is redacted before either sees it.
 */
export class Telemetry {
  constructor(
    private readonly logger: Logger,
    private readonly sink?: (event: TelemetryEvent) => void,
  ) {}

  track(event: TelemetryEventName, properties: TelemetryProperties): void {
    const clean: TelemetryEvent = { event, ...properties };
    if (clean.reason !== undefined) clean.reason = redact(clean.reason);
    if (clean.part !== undefined) clean.part = redact(clean.part);
    const line = `mdvm.${event} ${JSON.stringify(clean)}`;
    const level = WARNING_OUTCOMES.has(properties.outcome) ? 'warn' : 'info';
    this.logger[level](line);
    emitLogRecord(line, { ...clean }, level);
    this.sink?.(clean);
  }
}

/** A logger that redacts before it writes: wrap every external sink with it. */
export function redactingLogger(write: (level: 'info' | 'warn' | 'error', line: string) => void): Logger {
  return {
    info: (m) => write('info', redact(m)),
    warn: (m) => write('warn', redact(m)),
    error: (m) => write('error', redact(m)),
  };
}
