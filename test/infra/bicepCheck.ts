import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, relative, sep } from 'node:path';
import { Language, type Node, Parser } from 'web-tree-sitter';
import {
  AZURE_REQUIRED_SETTINGS,
  HOST_SETTING_NAMES,
  LOCAL_ONLY_SETTINGS,
  SETTING_NAMES,
} from '../../src/core/config.js';
import { checkKusto } from './kustoCheck.js';

/**
 * Offline Bicep checks (the Bicep CLI cannot be installed here): every file is parsed with the real
 * tree-sitter Bicep grammar, then the structure is checked against the rules of the infra issue.
 */
export interface Problem {
  readonly file: string;
  readonly line: number;
  readonly rule: string;
  readonly message: string;
}

export interface BicepReport {
  readonly problems: readonly Problem[];
  readonly files: readonly string[];
  /** Keys of every `Microsoft.Web/sites/config` 'appsettings' resource. */
  readonly appSettings: ReadonlyMap<string, string>;
}

let parser: Parser | undefined;

async function bicepParser(): Promise<Parser> {
  if (parser) return parser;
  await Parser.init();
  const require = createRequire(import.meta.url);
  const language = await Language.load(require.resolve('tree-sitter-bicep/tree-sitter-bicep.wasm'));
  parser = new Parser();
  parser.setLanguage(language);
  return parser;
}

function bicepFiles(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((entry) => {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) return bicepFiles(path);
    return entry.name.endsWith('.bicep') ? [path] : [];
  });
}

const named = (node: Node): Node[] => node.namedChildren.filter((c): c is Node => c !== null);

function walk(node: Node, visit: (n: Node) => void): void {
  visit(node);
  for (const child of named(node)) walk(child, visit);
}

/** Text of a string literal without quotes, or the identifier's text. */
function keyText(node: Node | undefined): string {
  if (!node) return '';
  if (node.type === 'string') return node.text.replace(/^'+|'+$/g, '');
  return node.text;
}

function property(object: Node | undefined, key: string): Node | undefined {
  if (object?.type !== 'object') return undefined;
  for (const prop of named(object)) {
    if (prop.type !== 'object_property') continue;
    const [k, v] = named(prop);
    if (keyText(k) === key) return v;
  }
  return undefined;
}

function propertyKeys(object: Node | undefined): { key: string; value: Node | undefined; line: number }[] {
  if (object?.type !== 'object') return [];
  return named(object)
    .filter((p) => p.type === 'object_property')
    .map((p) => {
      const [k, v] = named(p);
      return { key: keyText(k), value: v, line: p.startPosition.row + 1 };
    });
}

/** The object a resource declares, through `if (...)` and `[for ...: ...]`. */
function resourceBody(resource: Node): Node | undefined {
  let found: Node | undefined;
  const search = (n: Node, depth: number) => {
    if (found || depth > 3) return;
    for (const child of named(n)) {
      if (child.type === 'object') {
        found = child;
        return;
      }
      if (child.type === 'if_statement' || child.type === 'for_statement') search(child, depth + 1);
    }
  };
  search(resource, 0);
  return found;
}

function hasDescription(decorators: Node | undefined): boolean {
  if (decorators?.type !== 'decorators') return false;
  return named(decorators).some((d) => /^@\s*(sys\.)?description\s*\(/.test(d.text));
}

/**
 * Diagnostic settings the deployment must have: which module, on which storage service, and why. Each must send
 * the read, write and delete logs to a Log Analytics workspace.
 */
export const REQUIRED_DIAGNOSTICS = [
  { file: 'modules/landing-storage.bicep', service: 'blobServices', why: 'the audit trail of the landed data' },
  { file: 'modules/runtime-storage.bicep', service: 'queueServices', why: 'the poison-queue alert reads it' },
] as const;
const STORAGE_LOG_CATEGORIES = ['StorageRead', 'StorageWrite', 'StorageDelete'];

/** Alert rules the deployment must have: the suffix of the rule name and what its query must read. */
export const REQUIRED_ALERTS = [
  { suffix: '-poison', query: /StorageQueueLogs[\s\S]*PutMessage/, what: 'messages on the poison queue' },
  { suffix: '-function-failures', query: /AppRequests[\s\S]*Success == false/, what: 'function failures' },
  {
    suffix: '-snapshot-late',
    query: /Properties\.snapshot[\s\S]*generatedTime/,
    what: 'a snapshot not complete in time',
  },
  {
    suffix: '-defender-denied',
    query: /"mdvm\.defender\.calls"[\s\S]*"401-403"/,
    what: 'Defender answering 401/403',
  },
] as const;

/** What the workbook must show: a query step reading each. */
export const REQUIRED_WORKBOOK_QUERIES = [
  { query: /Properties\.snapshot[\s\S]*status[\s\S]*lag/i, what: 'snapshots per export with status and lag' },
  { query: /"mdvm\.bytes\.landed"/, what: 'throughput (bytes landed)' },
  { query: /"mdvm\.failures"[\s\S]*class/, what: 'failures by error class' },
  { query: /SeverityLevel[\s\S]*reason/, what: 'the last errors' },
] as const;

/** A query as deployed: its text with sample values for the placeholders the Bicep fills, and where it lives. */
interface ResolvedQuery {
  readonly text: string;
  /** The .kql file (relative to infra/) the text came from, or the Bicep file of an inline query. */
  readonly file: string;
  /** Line of the query's first line in that file. */
  readonly line: number;
}

interface DiagnosticSetting {
  readonly file: string;
  readonly line: number;
  readonly scopeType: string;
  readonly enabled: ReadonlySet<string>;
  readonly hasWorkspace: boolean;
}

interface AlertRule {
  readonly file: string;
  readonly line: number;
  readonly name: string;
  readonly query: string;
}

const LOAD_TEXT = /loadTextContent\(\s*'([^']+)'\s*\)/g;

/**
 * The text a Bicep expression gives a query: a variable, a `loadTextContent('x.kql')` (optionally inside
 * `replace(..., '__NAME__', value)`), or a multi-line string. Placeholders the expression replaces get sample
 * values, so the Kusto check sees a query as deployed; a placeholder left in the text is reported.
 */
function resolveQuery(
  expression: string,
  variables: ReadonlyMap<string, string>,
  bicepFile: string,
  infraDir: string,
  line: number,
  problems: Problem[],
): ResolvedQuery | undefined {
  const text = variables.get(expression.trim()) ?? expression;
  const loads = [...text.matchAll(LOAD_TEXT)];
  let query: ResolvedQuery;
  if (loads.length === 1) {
    const file = join(dirname(bicepFile), loads[0]?.[1] ?? '')
      .split(sep)
      .join('/');
    const path = join(infraDir, file);
    if (!existsSync(path)) {
      problems.push({
        file: bicepFile,
        line,
        rule: 'missing-file',
        message: `loadTextContent: ${file} does not exist`,
      });
      return undefined;
    }
    query = { text: readFileSync(path, 'utf8'), file, line: 1 };
  } else {
    const literal = /'''\n?([\s\S]*?)'''/.exec(text);
    if (!literal) return undefined;
    query = { text: literal[1] ?? '', file: bicepFile, line };
  }
  const replaced = new Set([...text.matchAll(/'(__[A-Z_]+__)'/g)].map((m) => m[1] ?? ''));
  for (const placeholder of new Set([...query.text.matchAll(/__[A-Z_]+__/g)].map((m) => m[0]))) {
    if (!replaced.has(placeholder)) {
      problems.push({
        file: query.file,
        line: query.line,
        rule: 'kql-placeholder',
        message: `${placeholder} is never replaced by the Bicep that deploys this query`,
      });
    }
  }
  let sample = query.text;
  for (const placeholder of replaced)
    sample = sample.replaceAll(placeholder, /HOURS|COUNT/.test(placeholder) ? '6' : 'sample');
  return { ...query, text: sample };
}

/** Kusto problems of one query, at their line in the file the query lives in. */
function kustoProblems(query: ResolvedQuery, what: string): Problem[] {
  return checkKusto(query.text).map((d) => ({
    file: query.file,
    line: query.line + d.line - 1,
    rule: d.rule,
    message: `${what}: ${d.message}`,
  }));
}

const SECRET_NAME = /(key|secret|password|connectionstring|sas|token)/i;
const SECRET_CALL = /\blist(Keys|AccountSas|ServiceSas|ConnectionStrings|Secrets)\s*\(/;

export async function checkBicep(infraDir: string): Promise<BicepReport> {
  const p = await bicepParser();
  const problems: Problem[] = [];
  const appSettings = new Map<string, string>();
  const files = bicepFiles(infraDir);
  let nodeRuntime = 0;
  const diagnostics: DiagnosticSetting[] = [];
  const alerts: AlertRule[] = [];
  const modulesUsed = new Set<string>();
  const workbooks: { file: string; queries: ResolvedQuery[] }[] = [];
  const queriesLoaded = new Set<string>();

  for (const path of files) {
    const file = relative(infraDir, path);
    const source = readFileSync(path, 'utf8');
    const tree = p.parse(source);
    if (!tree) throw new Error(`tree-sitter could not parse ${file}`);
    const add = (node: Node, rule: string, message: string) =>
      problems.push({ file, line: node.startPosition.row + 1, rule, message });

    walk(tree.rootNode, (n) => {
      if (n.type === 'ERROR' || n.isMissing) add(n, 'syntax', `syntax error near '${n.text.slice(0, 40)}'`);
    });
    if (tree.rootNode.hasError && !problems.some((x) => x.file === file && x.rule === 'syntax')) {
      add(tree.rootNode, 'syntax', 'syntax error');
    }

    for (const m of source.matchAll(LOAD_TEXT)) {
      queriesLoaded.add(
        join(dirname(file), m[1] ?? '')
          .split(sep)
          .join('/'),
      );
    }

    const top = named(tree.rootNode);
    // Symbols of this file: resource name → type, variable name → its value's text.
    const resourceTypes = new Map<string, string>();
    const variables = new Map<string, string>();
    for (const node of top) {
      const [symbol, second] = named(node);
      if (node.type === 'resource_declaration' && symbol) resourceTypes.set(symbol.text, keyText(second));
      if (node.type === 'variable_declaration' && symbol) variables.set(symbol.text, named(node).at(-1)?.text ?? '');
      if (node.type === 'module_declaration') {
        const path = keyText(named(node).find((c) => c.type === 'string'));
        modulesUsed.add(join(dirname(file), path).split(sep).join('/'));
      }
    }

    top.forEach((node, i) => {
      const before = top[i - 1];
      if (node.type === 'parameter_declaration' && !hasDescription(before)) {
        add(node, 'param-description', `parameter '${keyText(named(node)[0])}' has no @description`);
      }
      if (node.type === 'output_declaration') {
        const name = keyText(named(node)[0]);
        const secure = before?.type === 'decorators' && /@\s*(sys\.)?secure\s*\(/.test(before.text);
        if (SECRET_NAME.test(name) || SECRET_CALL.test(node.text) || secure) {
          add(node, 'secret-output', `output '${name}' looks like a secret`);
        }
        if (name !== name.toUpperCase()) add(node, 'output-case', `output '${name}' is not SCREAMING_CASE for azd`);
      }
    });

    walk(tree.rootNode, (n) => {
      if (SECRET_CALL.test(n.text) && named(n).every((c) => !SECRET_CALL.test(c.text))) {
        add(n, 'no-keys', `uses ${n.text.match(SECRET_CALL)?.[0]}: the app runs on managed identity, no keys`);
      }
      if (n.type === 'object_property' && keyText(named(n)[0]) === 'runtime') {
        const value = named(n)[1];
        const name = keyText(property(value, 'name'));
        const version = keyText(property(value, 'version'));
        if (name === 'node') {
          if (version === '22') nodeRuntime++;
          else add(property(value, 'version') ?? n, 'node-22', `runtime node version '${version}', expected '22'`);
        }
      }
      if (n.type !== 'resource_declaration') return;
      const type = keyText(named(n).find((c) => c.type === 'string'));
      if (/\bexisting\s*=/.test(n.text.slice(0, n.text.indexOf('{') + 1))) return;
      const body = resourceBody(n);
      const props = property(body, 'properties');
      if (/^Microsoft\.Storage\/storageAccounts@/.test(type)) {
        const sharedKey = property(props, 'allowSharedKeyAccess');
        if (sharedKey?.text !== 'false') {
          add(sharedKey ?? n, 'shared-key', 'storage account must set allowSharedKeyAccess: false');
        }
        const tls = property(props, 'minimumTlsVersion');
        if (keyText(tls) !== 'TLS1_2') add(n, 'tls', 'storage account must set minimumTlsVersion: TLS1_2');
        const publicAccess = property(props, 'allowBlobPublicAccess');
        if (publicAccess?.text !== 'false')
          add(n, 'public-access', 'storage account must set allowBlobPublicAccess: false');
      }
      if (/^Microsoft\.Authorization\/roleAssignments@/.test(type)) {
        const name = property(body, 'name');
        if (!(name?.type === 'call_expression' && /^guid\s*\(/.test(name.text))) {
          add(name ?? n, 'role-guid', 'role assignment name must be guid(...)');
        }
        // Without principalType ARM looks the principal up in Entra, which fails for one created a moment ago.
        if (!property(props, 'principalType')) add(n, 'principal-type', 'role assignment must set principalType');
        const scopeType = resourceTypes.get(property(body, 'scope')?.text ?? '') ?? '';
        if (file === 'modules/landing-storage.bicep' && /^Microsoft\.Storage\/storageAccounts@/.test(scopeType)) {
          add(
            property(body, 'scope') ?? n,
            'landing-scope',
            'roles on landed data are granted on the landing container, not the account',
          );
        }
      }
      if (/^Microsoft\.Insights\/components@/i.test(type) && property(props, 'DisableLocalAuth')?.text !== 'true') {
        if (property(props, 'disableLocalAuth')?.text !== 'true') {
          add(n, 'local-auth', 'Application Insights must set DisableLocalAuth: true');
        }
      }
      if (/^Microsoft\.Web\/sites\/config@/.test(type) && keyText(property(body, 'name')) === 'appsettings') {
        for (const { key, value } of propertyKeys(props)) appSettings.set(key, value?.text ?? '');
        for (const { key, value, line } of propertyKeys(props)) {
          if (/AccountKey=|SharedAccessSignature=|listKeys/i.test(value?.text ?? '')) {
            problems.push({ file, line, rule: 'key-setting', message: `app setting ${key} carries a key` });
          }
        }
      }
      if (/^Microsoft\.Insights\/diagnosticSettings@/.test(type)) {
        const enabled = new Set<string>();
        const logs = property(props, 'logs');
        for (const entry of logs ? named(logs).filter((c) => c.type === 'object') : []) {
          if (property(entry, 'enabled')?.text === 'true') enabled.add(keyText(property(entry, 'category')));
        }
        diagnostics.push({
          file,
          line: n.startPosition.row + 1,
          scopeType: resourceTypes.get(property(body, 'scope')?.text ?? '') ?? '',
          enabled,
          hasWorkspace: property(props, 'workspaceId') !== undefined,
        });
      }
      if (/^Microsoft\.Insights\/scheduledQueryRules@/.test(type)) {
        const line = n.startPosition.row + 1;
        const name = property(body, 'name')?.text ?? '';
        const condition = property(property(props, 'criteria'), 'allOf');
        const first = condition ? named(condition).find((c) => c.type === 'object') : undefined;
        const queryNode = property(first, 'query');
        const resolved = queryNode
          ? resolveQuery(queryNode.text, variables, file, infraDir, queryNode.startPosition.row + 1, problems)
          : undefined;
        const query = resolved?.text ?? '';
        alerts.push({ file, line, name, query });
        if (resolved) problems.push(...kustoProblems(resolved, `alert rule ${name}`));
        if (property(props, 'enabled')?.text !== 'true') {
          add(property(props, 'enabled') ?? n, 'alert-disabled', `alert rule ${name} must set enabled: true`);
        }
        for (const key of ['severity', 'evaluationFrequency', 'windowSize', 'scopes', 'actions']) {
          if (!property(props, key)) add(n, 'alert-shape', `alert rule ${name} has no ${key}`);
        }
        if (!query || property(first, 'threshold') === undefined || property(first, 'operator') === undefined) {
          add(n, 'alert-shape', `alert rule ${name} needs a criteria.allOf query, operator and threshold`);
        }
      }
      if (/^Microsoft\.Insights\/workbooks@/.test(type)) {
        const name = property(body, 'name');
        if (!(name?.type === 'call_expression' && /^guid\s*\(/.test(name.text))) {
          add(name ?? n, 'workbook-shape', 'a workbook name must be guid(...)');
        }
        if (keyText(property(body, 'kind')) !== 'shared') add(n, 'workbook-shape', "a workbook must be kind: 'shared'");
        if (keyText(property(props, 'category')) !== 'workbook') {
          add(n, 'workbook-shape', "a workbook must set category: 'workbook'");
        }
        for (const key of ['displayName', 'serializedData', 'sourceId']) {
          if (!property(props, key)) add(n, 'workbook-shape', `a workbook needs properties.${key}`);
        }
        // The App* tables exist in the workspace; scoped to the component, the steps would see the classic schema.
        if (!/resourceType:\s*'microsoft\.operationalinsights\/workspaces'/i.test(source)) {
          add(n, 'workbook-scope', 'workbook query steps must read the Log Analytics workspace');
        }
        const queries: ResolvedQuery[] = [];
        for (const m of source.matchAll(LOAD_TEXT)) {
          const line = source.slice(0, m.index).split('\n').length;
          const resolved = resolveQuery(m[0], variables, file, infraDir, line, problems);
          if (!resolved) continue;
          queries.push(resolved);
          problems.push(...kustoProblems(resolved, 'workbook query'));
        }
        workbooks.push({ file, queries });
      }
      const siteConfigSettings = property(property(props, 'siteConfig'), 'appSettings');
      if (siteConfigSettings) add(n, 'app-settings-shape', 'set app settings in a sites/config appsettings resource');
    });
  }

  if (files.length > 0 && nodeRuntime === 0) {
    problems.push({ file: '(all)', line: 0, rule: 'node-22', message: "no runtime { name: 'node', version: '22' }" });
  }
  problems.push(...checkAppSettings(appSettings));
  const relativeFiles = files.map((f) => relative(infraDir, f).split(sep).join('/'));
  problems.push(...checkDiagnostics(relativeFiles, diagnostics), ...checkAlerts(relativeFiles, alerts));
  problems.push(...checkWorkbooks(workbooks));
  const queriesDir = join(infraDir, 'queries');
  for (const name of existsSync(queriesDir) ? readdirSync(queriesDir) : []) {
    if (name.endsWith('.kql') && !queriesLoaded.has(`queries/${name}`)) {
      problems.push({
        file: `queries/${name}`,
        line: 1,
        rule: 'query-unused',
        message: `queries/${name} is never deployed`,
      });
    }
  }
  for (const file of relativeFiles.filter((f) => f.startsWith('modules/'))) {
    if (!modulesUsed.has(file))
      problems.push({ file, line: 1, rule: 'module-unused', message: `${file} is never deployed` });
  }
  return { problems, files: relativeFiles, appSettings };
}

/** The Bicep's app settings against the settings the code (and the host) read. */
export function checkAppSettings(appSettings: ReadonlyMap<string, string>): Problem[] {
  const problems: Problem[] = [];
  const problem = (rule: string, message: string) => problems.push({ file: '(app settings)', line: 0, rule, message });
  if (appSettings.size === 0) {
    problem('app-settings', "no Microsoft.Web/sites/config 'appsettings' resource found");
    return problems;
  }
  const required = [...AZURE_REQUIRED_SETTINGS, ...HOST_SETTING_NAMES];
  for (const name of required) {
    if (!appSettings.has(name)) problem('missing-setting', `app setting ${name} is required and not set`);
  }
  const readByCode = new Set<string>([...SETTING_NAMES, ...HOST_SETTING_NAMES]);
  for (const name of appSettings.keys()) {
    if ((LOCAL_ONLY_SETTINGS as readonly string[]).includes(name)) {
      problem(
        'key-setting',
        `app setting ${name} is a connection string (local only); use the identity-based settings`,
      );
    } else if (name === 'MDVM_ALLOW_LOOPBACK') {
      problem('local-setting', 'MDVM_ALLOW_LOOPBACK is for the local profile only');
    } else if (!readByCode.has(name)) {
      problem('unknown-setting', `app setting ${name} is never read by the code or the host`);
    }
  }
  return problems;
}

function checkDiagnostics(files: readonly string[], diagnostics: readonly DiagnosticSetting[]): Problem[] {
  const problems: Problem[] = [];
  for (const required of REQUIRED_DIAGNOSTICS) {
    if (!files.includes(required.file)) continue;
    const candidates = diagnostics.filter(
      (d) =>
        d.file === required.file && d.scopeType.startsWith(`Microsoft.Storage/storageAccounts/${required.service}@`),
    );
    if (candidates.length === 0) {
      problems.push({
        file: required.file,
        line: 1,
        rule: 'diagnostics',
        message: `no diagnostic setting on ${required.service} (${required.why})`,
      });
    }
    for (const d of candidates) {
      const missing = STORAGE_LOG_CATEGORIES.filter((c) => !d.enabled.has(c));
      if (missing.length > 0 || !d.hasWorkspace) {
        problems.push({
          file: d.file,
          line: d.line,
          rule: 'diagnostics',
          message: `the ${required.service} diagnostic setting must send ${STORAGE_LOG_CATEGORIES.join(', ')} to a workspace (${required.why}); ${missing.length > 0 ? `not enabled: ${missing.join(', ')}` : 'no workspaceId'}`,
        });
      }
    }
  }
  return problems;
}

function checkWorkbooks(workbooks: readonly { file: string; queries: readonly ResolvedQuery[] }[]): Problem[] {
  if (workbooks.length === 0) {
    return [{ file: '(all)', line: 0, rule: 'workbook-missing', message: 'no Microsoft.Insights/workbooks resource' }];
  }
  const problems: Problem[] = [];
  for (const required of REQUIRED_WORKBOOK_QUERIES) {
    if (!workbooks.some((w) => w.queries.some((q) => required.query.test(q.text)))) {
      problems.push({
        file: workbooks[0]?.file ?? '(all)',
        line: 1,
        rule: 'workbook-missing',
        message: `the workbook has no query step for ${required.what} (${required.query})`,
      });
    }
  }
  return problems;
}

function checkAlerts(files: readonly string[], alerts: readonly AlertRule[]): Problem[] {
  if (!files.includes('modules/alerts.bicep')) {
    return [{ file: '(all)', line: 0, rule: 'alert-missing', message: 'no modules/alerts.bicep' }];
  }
  const problems: Problem[] = [];
  for (const required of REQUIRED_ALERTS) {
    const rule = alerts.find((a) => a.name.includes(`${required.suffix}'`));
    if (!rule) {
      problems.push({
        file: 'modules/alerts.bicep',
        line: 1,
        rule: 'alert-missing',
        message: `no alert rule named *${required.suffix} (${required.what})`,
      });
    } else if (!required.query.test(rule.query)) {
      problems.push({
        file: rule.file,
        line: rule.line,
        rule: 'alert-query',
        message: `alert rule *${required.suffix} does not query ${required.what} (${required.query})`,
      });
    }
  }
  return problems;
}
