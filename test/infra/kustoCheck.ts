import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { METRIC_DIMENSIONS, METRIC_NAMES } from '../../src/core/observability.js';
import { TELEMETRY_EVENTS, TELEMETRY_PROPERTY_NAMES } from '../../src/core/telemetry.js';

/**
 * Offline Kusto checks for the alert and workbook queries: the real Kusto language service (Kusto.Language, the
 * parser and binder Data Explorer and Log Analytics use, published to npm as JavaScript) parses each query and binds
 * it against the documented columns of the tables it reads. On top, every `mdvm.*` metric name, telemetry property
 * and event name a query uses must be one the code writes: a renamed metric would otherwise leave an alert that
 * never fires.
 */
export interface KustoDiagnostic {
  /** 1-based line within the query text. */
  readonly line: number;
  readonly rule: 'kql' | 'telemetry-name';
  readonly message: string;
}

interface KustoDiagnosticObject {
  Severity: string;
  Message: string;
  Start: number;
}
interface KustoLanguage {
  GlobalState: { Default: { WithCluster(c: unknown): { WithDatabase(d: unknown): unknown } } };
  KustoCode: {
    ParseAndAnalyze(
      text: string,
      globals: unknown,
    ): {
      GetDiagnostics(): { Count: number; getItem(i: number): KustoDiagnosticObject };
    };
  };
  Symbols: {
    TableSymbol: { $ctor7: new (name: string, schema: string, description: string | null) => unknown };
    DatabaseSymbol: { $ctor1: new (name: string, members: unknown[], isOpen: boolean) => unknown };
    ClusterSymbol: { ctor: new (name: string, databases: unknown[]) => unknown };
  };
}

let globals: { kusto: KustoLanguage; state: unknown } | undefined;

function kustoGlobals(): { kusto: KustoLanguage; state: unknown } {
  if (globals) return globals;
  const require = createRequire(import.meta.url);
  // Bridge.NET output: the runtime first, then the library; both define globals.
  require('@kusto/language-service-next/bridge.min.js');
  require('@kusto/language-service-next/Kusto.Language.Bridge.min.js');
  const kusto = (globalThis as unknown as { Kusto: { Language: KustoLanguage } }).Kusto.Language;
  const tables = JSON.parse(readFileSync(new URL('./monitorTables.json', import.meta.url), 'utf8')).tables as Record<
    string,
    [string, string][]
  >;
  const symbols = Object.entries(tables).map(
    ([name, columns]) =>
      new kusto.Symbols.TableSymbol.$ctor7(name, `(${columns.map(([c, t]) => `['${c}']:${t}`).join(', ')})`, null),
  );
  const database = new kusto.Symbols.DatabaseSymbol.$ctor1('workspace', symbols, false);
  const cluster = new kusto.Symbols.ClusterSymbol.ctor('loganalytics', [database]);
  globals = { kusto, state: kusto.GlobalState.Default.WithCluster(cluster).WithDatabase(database) };
  return globals;
}

function lineAt(text: string, offset: number): number {
  return text.slice(0, offset).split('\n').length;
}

const KNOWN_METRICS = new Set<string>(Object.values(METRIC_NAMES));
const KNOWN_PROPERTIES = new Set<string>([...TELEMETRY_PROPERTY_NAMES, ...METRIC_DIMENSIONS]);
const KNOWN_EVENTS = new Set<string>(TELEMETRY_EVENTS);

function kqlErrors(query: string, state: unknown): KustoDiagnostic[] {
  const { kusto } = kustoGlobals();
  const found: KustoDiagnostic[] = [];
  const diagnostics = kusto.KustoCode.ParseAndAnalyze(query, state).GetDiagnostics();
  for (let i = 0; i < diagnostics.Count; i++) {
    const d = diagnostics.getItem(i);
    if (d.Severity === 'Error') found.push({ line: lineAt(query, d.Start), rule: 'kql', message: d.Message });
  }
  return found;
}

/**
 * Parse and bind a query or control command against a Data Explorer database holding only `tables` (name to
 * `[column, type]` pairs): the downstream scripts, checked without a cluster.
 */
export function checkKustoAgainst(query: string, tables: Record<string, readonly (readonly [string, string])[]>) {
  const { kusto } = kustoGlobals();
  const symbols = Object.entries(tables).map(
    ([name, columns]) =>
      new kusto.Symbols.TableSymbol.$ctor7(name, `(${columns.map(([c, t]) => `['${c}']:${t}`).join(', ')})`, null),
  );
  const database = new kusto.Symbols.DatabaseSymbol.$ctor1('mdvm', symbols, false);
  const cluster = new kusto.Symbols.ClusterSymbol.ctor('adx', [database]);
  return kqlErrors(query, kusto.GlobalState.Default.WithCluster(cluster).WithDatabase(database));
}

/** Parse and bind one query; then check the names it takes from the app's telemetry. */
export function checkKusto(query: string): KustoDiagnostic[] {
  const { state } = kustoGlobals();
  const found = kqlErrors(query, state);
  const at = (index: number) => lineAt(query, index);
  for (const m of query.matchAll(/"(mdvm\.[a-z.]+)"/g)) {
    if (!KNOWN_METRICS.has(m[1] ?? '')) {
      found.push({ line: at(m.index), rule: 'telemetry-name', message: `no metric named ${m[1]} is written` });
    }
  }
  for (const m of query.matchAll(/Properties(?:\.([A-Za-z_]+)|\["([^"]+)"\])/g)) {
    const name = m[1] ?? m[2] ?? '';
    if (!KNOWN_PROPERTIES.has(name)) {
      found.push({ line: at(m.index), rule: 'telemetry-name', message: `no telemetry property named ${name}` });
    }
  }
  // Values compared with the event property: `event == "x"` or `event in ("x", "y")`.
  for (const m of query.matchAll(/\bevent\)?\s*(?:==\s*"([^"]*)"|in\s*\(([^)]*)\))/g)) {
    const values = m[1] !== undefined ? [m[1]] : [...(m[2] ?? '').matchAll(/"([^"]*)"/g)].map((v) => v[1] ?? '');
    for (const value of values.filter((v) => !KNOWN_EVENTS.has(v))) {
      found.push({ line: at(m.index), rule: 'telemetry-name', message: `no telemetry event named ${value}` });
    }
  }
  return found;
}
