import { cpSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import ignore from 'ignore';
import { afterEach, describe, expect, it } from 'vitest';
import { parse } from 'yaml';
import { AZURE_REQUIRED_SETTINGS, HOST_SETTING_NAMES, SETTING_NAMES } from '../../src/core/config.js';
import { METRIC_NAMES } from '../../src/core/observability.js';
import { TELEMETRY_EVENTS } from '../../src/core/telemetry.js';
import { STAGING_FOLDER } from '../../src/deploy/functionPackage.js';
import { NODE_ARGUMENTS } from '../../src/deploy/nodeArguments.js';
import { checkBicep, REQUIRED_ALERTS } from '../infra/bicepCheck.js';

interface HookVariant {
  shell?: string;
  run: string;
}
interface Hook {
  posix?: HookVariant;
  windows?: HookVariant;
}
interface AzureYaml {
  hooks: Record<string, Hook>;
  services: { api: { hooks: Record<string, Hook> } };
}

const infra = new URL('../../infra', import.meta.url).pathname;
const copies: string[] = [];
afterEach(() => {
  for (const dir of copies.splice(0)) rmSync(dir, { recursive: true, force: true });
});

/** A copy of infra/ with one file changed; `edit` must really change it. */
function brokenCopy(file: string, edit: (text: string) => string): string {
  const dir = mkdtempSync(join(tmpdir(), 'mdvm-infra-'));
  copies.push(dir);
  cpSync(infra, dir, { recursive: true });
  const path = join(dir, file);
  const before = readFileSync(path, 'utf8');
  const after = edit(before);
  expect(after, `the edit of ${file} changed nothing`).not.toBe(before);
  writeFileSync(path, after);
  return dir;
}

function lineOf(text: string, needle: string): number {
  const index = text.indexOf(needle);
  expect(index, `'${needle}' not found`).toBeGreaterThanOrEqual(0);
  return text.slice(0, index).split('\n').length;
}

describe('infrastructure (offline Bicep checks)', () => {
  it('parses every Bicep file with the real grammar and passes every structural check', async () => {
    const report = await checkBicep(infra);
    expect(report.files).toEqual(
      expect.arrayContaining(['main.bicep', 'modules/function-app.bicep', 'modules/runtime-storage.bicep']),
    );
    expect(report.problems).toEqual([]);
  });

  it('sets exactly the settings the code and the host read, identity-based, from the same names as the schema', async () => {
    const { appSettings } = await checkBicep(infra);
    const names = [...appSettings.keys()];
    for (const required of [...AZURE_REQUIRED_SETTINGS, ...HOST_SETTING_NAMES]) expect(names).toContain(required);
    for (const name of names) expect([...SETTING_NAMES, ...HOST_SETTING_NAMES]).toContain(name);
    expect(names).not.toContain('AzureWebJobsStorage');
    expect(names).not.toContain('MDVM_LANDING_CONNECTION_STRING');
    expect(appSettings.get('AzureWebJobsStorage__credential')).toBe("'managedidentity'");
    expect(appSettings.get('APPLICATIONINSIGHTS_AUTHENTICATION_STRING')).toMatch(/Authorization=AAD/);
  });

  it('gives the worker, npm start and a local Core Tools run the same Node.js arguments as nodeArguments.ts', async () => {
    const expected = NODE_ARGUMENTS.join(' ');
    expect(expected).toMatch(/^--initial-old-space-size=\d+$/);
    const { appSettings } = await checkBicep(infra);
    expect(appSettings.get('languageWorkers__node__arguments')).toBe(`'${expected}'`);
    const root = new URL('../..', import.meta.url);
    const scripts = JSON.parse(readFileSync(new URL('package.json', root), 'utf8')).scripts as Record<string, string>;
    expect(scripts.start).toContain(`node ${expected} dist/src/local/start.js`);
    const sample = JSON.parse(readFileSync(new URL('local.settings.sample.json', root), 'utf8'));
    expect(sample.Values.languageWorkers__node__arguments).toBe(expected);
  });

  it.each([
    {
      what: 'a syntax error',
      file: 'main.bicep',
      edit: (t: string) => t.replace('param exports string', 'param exports string = = '),
      needle: 'param exports string',
      rule: 'syntax',
    },
    {
      what: 'a missing app setting',
      file: 'modules/function-app.bicep',
      edit: (t: string) => t.replace(/\n\s*MDVM_LANDING_BLOB_ENDPOINT:[^\n]*/, ''),
      rule: 'missing-setting',
      message: /MDVM_LANDING_BLOB_ENDPOINT/,
    },
    {
      what: 'a key-based setting',
      file: 'modules/function-app.bicep',
      edit: (t: string) =>
        t.replace(
          /(\n(\s*)MDVM_LANDING_BLOB_ENDPOINT:)/,
          "\n$2AzureWebJobsStorage: 'DefaultEndpointsProtocol=https;AccountName=x;AccountKey=${uniqueString('k')}'$1",
        ),
      rule: 'key-setting',
      message: /AzureWebJobsStorage/,
    },
    {
      what: 'a setting the code never reads',
      file: 'modules/function-app.bicep',
      edit: (t: string) => t.replace(/(\n(\s*)MDVM_LANDING_BLOB_ENDPOINT:)/, "\n$2MDVM_TURBO: 'on'$1"),
      rule: 'unknown-setting',
      message: /MDVM_TURBO/,
    },
    {
      what: 'shared key access enabled',
      file: 'modules/runtime-storage.bicep',
      edit: (t: string) => t.replace('allowSharedKeyAccess: false', 'allowSharedKeyAccess: true'),
      needle: 'allowSharedKeyAccess: true',
      rule: 'shared-key',
    },
    {
      what: 'a role assignment not named with guid()',
      file: 'modules/runtime-storage.bicep',
      edit: (t: string) => t.replace(/name: guid\(storage\.id[^\n]*/, "name: 'blob-owner'"),
      needle: "name: 'blob-owner'",
      rule: 'role-guid',
    },
    {
      what: 'a parameter without a description',
      file: 'main.bicep',
      edit: (t: string) => t.replace(/@description\([^\n]*\)\nparam exports/, 'param exports'),
      needle: 'param exports',
      rule: 'param-description',
    },
    {
      what: 'another Node version',
      file: 'modules/function-app.bicep',
      edit: (t: string) => t.replace("version: '22'", "version: '20'"),
      needle: "version: '20'",
      rule: 'node-22',
    },
    {
      what: 'a secret output',
      file: 'main.bicep',
      edit: (t: string) =>
        `${t}\n@description('oops')\noutput LANDING_KEY string = listKeys(resourceId('Microsoft.Storage/storageAccounts', 'x'), '2023-05-01').keys[0].value\n`,
      needle: 'output LANDING_KEY',
      rule: 'secret-output',
    },
    {
      what: 'a landing audit log category switched off',
      file: 'modules/landing-storage.bicep',
      edit: (t: string) => t.replace(/(category: 'StorageDelete'\n\s*enabled: )true/, '$1false'),
      needle: 'resource blobAuditLogs',
      rule: 'diagnostics',
      message: /not enabled: StorageDelete/,
    },
    {
      what: 'the runtime queue logs removed',
      file: 'modules/runtime-storage.bicep',
      edit: (t: string) => t.replace(/resource queueLogs [\s\S]*?\n}\n/, ''),
      rule: 'diagnostics',
      message: /no diagnostic setting on queueServices/,
    },
    {
      what: 'audit logs sent nowhere',
      file: 'modules/landing-storage.bicep',
      edit: (t: string) => t.replace(/\n\s*workspaceId: logAnalyticsWorkspaceId/, ''),
      needle: 'resource blobAuditLogs',
      rule: 'diagnostics',
      message: /no workspaceId/,
    },
    {
      what: 'a disabled alert rule',
      file: 'modules/alerts.bicep',
      edit: (t: string) =>
        t.replace(/(displayName: 'mdvm-ingest: parts dead-lettered'[\s\S]*?enabled: )true/, '$1false'),
      needle: 'enabled: false',
      rule: 'alert-disabled',
    },
    {
      what: 'the poison-queue alert removed',
      file: 'modules/alerts.bicep',
      edit: (t: string) => t.replace(/resource poisonAlert [\s\S]*?\n}\n/, '').replace(/\n\s*poisonAlert\.id/, ''),
      rule: 'alert-missing',
      message: /poison queue/,
    },
    {
      what: 'a late-snapshot alert that queries something else',
      file: 'modules/alerts.bicep',
      edit: (t: string) => t.replace('query: lateSnapshotQuery', 'query: failuresQuery'),
      needle: 'resource lateSnapshotAlert',
      rule: 'alert-query',
    },
    {
      what: 'an alert rule without a threshold',
      file: 'modules/alerts.bicep',
      edit: (t: string) => t.replace(/(query: failuresQuery[\s\S]*?)\n\s*threshold: 0/, '$1'),
      needle: 'resource failuresAlert',
      rule: 'alert-shape',
    },
    {
      what: 'the alerts module not deployed',
      file: 'main.bicep',
      edit: (t: string) => t.replace(/module alerts [\s\S]*?\n}\n/, ''),
      rule: 'module-unused',
      message: /modules\/alerts\.bicep is never deployed/,
    },
    {
      what: 'the landing reader granted on the whole account',
      file: 'modules/landing-storage.bicep',
      edit: (t: string) => t.replace(/(resource blobDataReader[\s\S]*?scope: )container/, '$1storage'),
      needle: 'scope: storage',
      rule: 'landing-scope',
    },
    {
      what: 'a role assignment without principalType',
      file: 'modules/landing-storage.bicep',
      edit: (t: string) => t.replace(/\n\s*principalType: readerPrincipalType/, ''),
      needle: 'resource blobDataReader',
      rule: 'principal-type',
    },
    {
      what: 'an alert query that compares the storage log status code as a number (it is a string)',
      file: 'queries/alert-poison.kql',
      edit: (t: string) => t.replace('toint(StatusCode) between', 'StatusCode between'),
      needle: 'StatusCode between',
      rule: 'kql',
      message: /between' is not defined for the operand types string/,
    },
    {
      what: 'an alert query reading a column the table does not have',
      file: 'queries/alert-function-failures.kql',
      edit: (t: string) => t.replace('Success == false', 'Succeeded == false'),
      needle: 'Succeeded == false',
      rule: 'kql',
      message: /Succeeded/,
    },
    {
      what: 'a workbook query with a Kusto syntax error',
      file: 'queries/workbook-lag.kql',
      edit: (t: string) => t.replace('sum(ItemCount),', 'sum(ItemCount,'),
      rule: 'kql',
      message: /workbook query/,
    },
    {
      what: 'a workbook query on a metric the app does not write',
      file: 'queries/workbook-throughput.kql',
      edit: (t: string) => t.replace('"mdvm.bytes.landed"', '"mdvm.bytes.copied"'),
      needle: 'mdvm.bytes.copied',
      rule: 'telemetry-name',
      message: /no metric named mdvm\.bytes\.copied/,
    },
    {
      what: 'an alert query on an event the app does not write',
      file: 'queries/alert-snapshot-late.kql',
      edit: (t: string) => t.replace('event == "request"', 'event == "tick"'),
      needle: 'event == "tick"',
      rule: 'telemetry-name',
      message: /no telemetry event named tick/,
    },
    {
      what: 'an alert query on a property no event carries',
      file: 'queries/alert-defender-denied.kql',
      edit: (t: string) => t.replace('Properties.status', 'Properties.httpStatus'),
      needle: 'Properties.httpStatus',
      rule: 'telemetry-name',
      message: /no telemetry property named httpStatus/,
    },
    {
      what: 'the Defender 401/403 alert removed',
      file: 'modules/alerts.bicep',
      edit: (t: string) =>
        t.replace(/resource defenderDeniedAlert [\s\S]*?\n}\n/, '').replace(/\n\s*defenderDeniedAlert\.id/, ''),
      rule: 'alert-missing',
      message: /Defender answering 401\/403/,
    },
    {
      what: 'a query placeholder the Bicep never fills',
      file: 'modules/alerts.bicep',
      edit: (t: string) =>
        t.replace(
          /var poisonQuery = replace\([\s\S]*?derivePoisonQueueName\n\)\n/,
          "var poisonQuery = loadTextContent('../queries/alert-poison.kql')\n",
        ),
      rule: 'kql-placeholder',
      message: /__POISON_QUEUE__/,
    },
    {
      what: 'a query file that does not exist',
      file: 'modules/alerts.bicep',
      edit: (t: string) =>
        t.replace("'../queries/alert-defender-denied.kql'", "'../queries/alert-defender-refused.kql'"),
      rule: 'missing-file',
      message: /alert-defender-refused\.kql/,
    },
    {
      what: 'the workbook not deployed',
      file: 'main.bicep',
      edit: (t: string) => t.replace(/module workbook [\s\S]*?\n}\n/, ''),
      rule: 'module-unused',
      message: /modules\/workbook\.bicep is never deployed/,
    },
    {
      what: 'a workbook not named with guid()',
      file: 'modules/workbook.bicep',
      edit: (t: string) => t.replace(/name: guid\(applicationInsightsId[^\n]*/, "name: 'mdvm-ingest'"),
      needle: "name: 'mdvm-ingest'",
      rule: 'workbook-shape',
    },
    {
      what: 'workbook steps scoped to the component (classic schema, no App* tables)',
      file: 'modules/workbook.bicep',
      edit: (t: string) =>
        t.replaceAll(
          "resourceType: 'microsoft.operationalinsights/workspaces'",
          "resourceType: 'microsoft.insights/components'",
        ),
      needle: 'resource workbook ',
      rule: 'workbook-scope',
    },
    {
      what: 'the workbook without its last-errors step',
      file: 'modules/workbook.bicep',
      edit: (t: string) => t.replace(/\n\s*queryStep\('errors'[^\n]*/, ''),
      rule: 'workbook-missing',
      message: /the last errors/,
    },
  ])('catches $what', async ({ file, edit, rule, needle, message }) => {
    const dir = brokenCopy(file, edit);
    const report = await checkBicep(dir);
    const found = report.problems.filter((p) => p.rule === rule);
    expect(found.length, JSON.stringify(report.problems)).toBeGreaterThan(0);
    if (message) expect(found.map((p) => p.message).join('\n')).toMatch(message);
    if (needle) {
      const text = readFileSync(join(dir, file), 'utf8');
      expect(found).toContainEqual(expect.objectContaining({ file, line: lineOf(text, needle) }));
    }
  });

  it("the README's Monitoring section shows every deployed query verbatim and explains every alert", () => {
    const readme = readFileSync(new URL('../../README.md', import.meta.url), 'utf8');
    const start = readme.indexOf('\n## Monitoring\n');
    expect(start, 'README has a "## Monitoring" section').toBeGreaterThan(0);
    const section = readme.slice(start, readme.indexOf('\n## ', start + 1));
    const blocks = [...section.matchAll(/```kusto\n([\s\S]*?)```/g)].map((m) => m[1]);
    const queries = readdirSync(join(infra, 'queries')).filter((f) => f.endsWith('.kql'));
    expect(queries.length).toBeGreaterThanOrEqual(8);
    for (const file of queries) expect(blocks, file).toContain(readFileSync(join(infra, 'queries', file), 'utf8'));
    const alerts = readFileSync(join(infra, 'modules/alerts.bicep'), 'utf8');
    const names = [...alerts.matchAll(/displayName: '([^']+)'/g)].map((m) => m[1] ?? '');
    expect(names).toHaveLength(REQUIRED_ALERTS.length);
    for (const name of names) expect(section).toContain(`**${name}**`);
    for (const metric of Object.values(METRIC_NAMES)) expect(section).toContain(`\`${metric}\``);
    for (const event of TELEMETRY_EVENTS) expect(section).toContain(`\`${event}\``);
  });

  it('azure.yaml follows azd conventions and deploys the package npm run package makes', () => {
    const azure = parse(readFileSync(new URL('../../azure.yaml', import.meta.url), 'utf8'));
    expect(azure.name).toBe('mdvm-ingest');
    const api = azure.services.api;
    expect(api).toMatchObject({ project: '.', language: 'ts', host: 'function', remoteBuild: false });
    // azd zips the dist folder as it is: the staging folder of `npm run package`.
    expect(api.dist).toBe(`build/${STAGING_FOLDER}`);
    // azd rejects `remoteBuild: false` when the project's .funcignore excludes node_modules (azure-dev
    // resolveFunctionAppRemoteBuild), and it reads that file with gitignore rules.
    const funcignore = ignore().add(readFileSync(new URL('../../.funcignore', import.meta.url), 'utf8'));
    expect(funcignore.ignores('node_modules/')).toBe(false);
    expect(funcignore.ignores('src/')).toBe(true);
    expect(funcignore.ignores('dist/src/functions/index.js')).toBe(false);
  });

  // azd runs a hook's `posix` or `windows` variant for the operator's OS, and refuses a hook that has no `run`
  // for it: every hook has both, and each runs something that exists in the repository.
  it.each([
    ['postprovision', (azure: AzureYaml) => azure.hooks.postprovision],
    ['service prepackage', (azure: AzureYaml) => azure.services.api.hooks.prepackage],
    ['service predeploy', (azure: AzureYaml) => azure.services.api.hooks.predeploy],
  ])('the %s hook runs on Linux, macOS and Windows', (_name, hookOf) => {
    const azure = parse(readFileSync(new URL('../../azure.yaml', import.meta.url), 'utf8')) as AzureYaml;
    const hook = hookOf(azure) ?? {};
    expect(hook.posix?.run).toBeTruthy();
    expect(hook.windows?.run).toBeTruthy();
    expect(hook.windows?.shell).toBe('pwsh');
    for (const variant of [hook.posix, hook.windows]) {
      const words = variant?.run.split(/\s+/) ?? [];
      if (words[0] === 'node') expect(existsSync(new URL(`../../${words[1]}`, import.meta.url)), words[1]).toBe(true);
      else expect(words.slice(0, 2)).toEqual(['npm', 'run']);
      if (words[0] === 'npm') {
        const scripts = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')).scripts;
        expect(scripts[words[2] ?? '']).toBeTruthy();
      }
    }
  });

  it('gives the deploying user read access to the manifest tables, for the status and verify the alerts point to', () => {
    const bicep = (path: string) => readFileSync(new URL(`../../infra/${path}`, import.meta.url), 'utf8');
    const runtime = bicep('modules/runtime-storage.bicep');
    expect(runtime).toContain("var storageTableDataReaderRoleId = '76199698-9eea-4c19-bc75-cec21354c6b6'");
    for (const table of ['snapshotsTable', 'partsTable']) {
      expect(runtime).toMatch(
        new RegExp(`guid\\(${table}\\.id, operatorPrincipalId, storageTableDataReaderRoleId\\)\\s+scope: ${table}\\n`),
      );
    }
    expect(bicep('main.bicep')).toMatch(/operatorPrincipalId: principalId\n\s+operatorPrincipalType: principalType/);
  });

  it('the parameters file fills what azd knows', () => {
    const parameters = JSON.parse(readFileSync(new URL('../../infra/main.parameters.json', import.meta.url), 'utf8'));
    expect(parameters.parameters).toMatchObject({
      environmentName: { value: '${AZURE_ENV_NAME}' },
      location: { value: '${AZURE_LOCATION}' },
    });
  });
});
