import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { checkBicep } from './bicepCheck.js';

/**
 * The app settings the Bicep gives the Function App, with every expression turned into the value a deployment
 * would have: literals as written, parameters through main.bicep's values and defaults, and the values only
 * Azure knows (endpoints, client id, connection string) as well-formed examples. What a package test hands to
 * the app as its environment, so the app starts from exactly the names and defaults the Bicep provides.
 */
export const EXAMPLE_CLIENT_ID = '00000000-1111-4222-8333-444444444444';
const EXAMPLE_ACCOUNT = 'stexample';

export async function exampleAppSettings(infraDir: string): Promise<Record<string, string>> {
  const { appSettings } = await checkBicep(infraDir);
  const functionApp = readFileSync(join(infraDir, 'modules/function-app.bicep'), 'utf8');
  const main = readFileSync(join(infraDir, 'main.bicep'), 'utf8');
  const moduleArguments = moduleParams(main, 'functionApp');

  const resolveIdentifier = (name: string): string => {
    if (name === 'identityClientId') return EXAMPLE_CLIENT_ID;
    // main.bicep passes a parameter of its own: its default is what azd deploys unless the operator sets it.
    const passed = moduleArguments.get(name);
    if (passed && /^[A-Za-z_]\w*$/.test(passed)) {
      const mainDefault = paramDefault(main, passed);
      if (mainDefault !== undefined) return mainDefault;
    }
    // Passed from another module's output: that module's parameter behind the output, when it is that simple.
    const output = passed?.match(/^(\w+)\.outputs\.(\w+)$/);
    if (output?.[1] && output[2]) {
      const fromOutput = outputParamDefault(infraDir, main, output[1], output[2]);
      if (fromOutput !== undefined) return fromOutput;
    }
    // Otherwise the function-app module's own default.
    const own = paramDefault(functionApp, name);
    if (own === undefined) throw new Error(`cannot resolve Bicep parameter '${name}' of function-app.bicep`);
    return own;
  };

  const resolve = (expression: string): string => {
    const text = expression.trim();
    const endpoint = text.match(/\.properties\.primaryEndpoints\.(blob|queue|table|dfs)$/);
    if (endpoint) return `https://${EXAMPLE_ACCOUNT}.${endpoint[1]}.core.windows.net/`;
    if (/\.properties\.ConnectionString$/.test(text)) {
      return `InstrumentationKey=${EXAMPLE_CLIENT_ID};IngestionEndpoint=https://example.in.applicationinsights.azure.com/`;
    }
    const call = text.match(/^string\((\w+)\)$/);
    if (call?.[1]) return resolveIdentifier(call[1]);
    if (/^'.*'$/s.test(text))
      return text.slice(1, -1).replace(/\$\{(\w+)\}/g, (_, name: string) => resolveIdentifier(name));
    if (/^[A-Za-z_]\w*$/.test(text)) return resolveIdentifier(text);
    throw new Error(`no example value for the Bicep expression ${text}`);
  };

  return Object.fromEntries([...appSettings].map(([key, expression]) => [key, resolve(expression)]));
}

/** `param name type = default` with a literal default: the default as a string. */
function paramDefault(source: string, name: string): string | undefined {
  const match = source.match(new RegExp(`^param ${name} \\w+ = (.+)$`, 'm'));
  const value = match?.[1]?.trim();
  if (value === undefined) return undefined;
  if (/^'.*'$/.test(value)) return value.slice(1, -1).replace(/\\'/g, "'");
  if (/^(\d+|true|false)$/.test(value)) return value;
  return undefined;
}

/** The `params: { ... }` a module declaration passes, as name → expression text. */
function moduleParams(source: string, symbol: string): Map<string, string> {
  const start = source.indexOf(`module ${symbol} `);
  if (start < 0) throw new Error(`main.bicep has no module ${symbol}`);
  const block = source.slice(source.indexOf('params: {', start));
  const body = block.slice('params: {'.length, block.indexOf('\n  }'));
  const params = new Map<string, string>();
  for (const line of body.split('\n')) {
    const match = line.match(/^\s*(\w+): (.+)$/);
    if (match?.[1] && match[2]) params.set(match[1], match[2].trim());
  }
  return params;
}

/** `output NAME string = resource.name` in a module, where the resource is named by a parameter with a default. */
function outputParamDefault(infraDir: string, main: string, symbol: string, output: string): string | undefined {
  const file = main.match(new RegExp(`^module ${symbol} '([^']+)'`, 'm'))?.[1];
  if (!file) return undefined;
  const source = readFileSync(join(infraDir, file), 'utf8');
  const resource = source.match(new RegExp(`^output ${output} \\w+ = (\\w+)\\.name$`, 'm'))?.[1];
  if (!resource) return undefined;
  const start = source.search(new RegExp(`^resource ${resource} `, 'm'));
  const nameParam = source.slice(start).match(/\n {2}name: (\w+)\n/)?.[1];
  return nameParam ? paramDefault(source, nameParam) : undefined;
}
