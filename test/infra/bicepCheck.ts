import { readdirSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join, relative } from 'node:path';
import { Language, type Node, Parser } from 'web-tree-sitter';
import {
  AZURE_REQUIRED_SETTINGS,
  HOST_SETTING_NAMES,
  LOCAL_ONLY_SETTINGS,
  SETTING_NAMES,
} from '../../src/core/config.js';

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

const SECRET_NAME = /(key|secret|password|connectionstring|sas|token)/i;
const SECRET_CALL = /\blist(Keys|AccountSas|ServiceSas|ConnectionStrings|Secrets)\s*\(/;

export async function checkBicep(infraDir: string): Promise<BicepReport> {
  const p = await bicepParser();
  const problems: Problem[] = [];
  const appSettings = new Map<string, string>();
  const files = bicepFiles(infraDir);
  let nodeRuntime = 0;

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

    const top = named(tree.rootNode);
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
      const siteConfigSettings = property(property(props, 'siteConfig'), 'appSettings');
      if (siteConfigSettings) add(n, 'app-settings-shape', 'set app settings in a sites/config appsettings resource');
    });
  }

  if (files.length > 0 && nodeRuntime === 0) {
    problems.push({ file: '(all)', line: 0, rule: 'node-22', message: "no runtime { name: 'node', version: '22' }" });
  }
  problems.push(...checkAppSettings(appSettings));
  return { problems, files: files.map((f) => relative(infraDir, f)), appSettings };
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
