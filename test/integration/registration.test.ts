import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { EXPORT_IDS } from '../../src/core/catalog.js';
import { ConfigError, loadConfig, SETTING_NAMES } from '../../src/core/config.js';
import { MAX_DEQUEUE_COUNT } from '../../src/core/landPart.js';
import { createApp, type Stack, startStack } from '../helpers/stack.js';

let stack: Stack;
beforeAll(async () => {
  stack = await startStack();
});
afterAll(async () => {
  await stack?.stop();
});

const stackSettings = () => ({
  AzureWebJobsStorage: stack.azurite.customer.connectionString,
  MDVM_LANDING_CONNECTION_STRING: stack.azurite.customer.connectionString,
});

describe('what the app declares for the Functions host', () => {
  it('one timer per enabled export type and one queue trigger, with the configured names', async () => {
    const app = await createApp(stack, {
      MDVM_EXPORTS: 'certificates,software-vulnerabilities',
      MDVM_SCHEDULE: '0 23 */2 * * *',
    });
    const functions = app.runner.functions;
    expect(functions.map((f) => f.name).sort()).toEqual([
      'copy-part',
      'derive',
      'export-certificates',
      'export-software-vulnerabilities',
    ]);
    for (const id of ['certificates', 'software-vulnerabilities']) {
      expect(functions.find((f) => f.name === `export-${id}`)).toMatchObject({
        kind: 'timer',
        exportId: id,
        trigger: { schedule: '0 23 */2 * * *', runOnStartup: false, useMonitor: true },
      });
    }
    expect(functions.find((f) => f.name === 'copy-part')).toMatchObject({
      kind: 'storageQueue',
      trigger: { queueName: `parts-${app.suffix}`, connection: 'AzureWebJobsStorage' },
    });
    expect(functions.find((f) => f.name === 'derive')).toMatchObject({
      kind: 'storageQueue',
      trigger: { queueName: `derive-${app.suffix}`, connection: 'AzureWebJobsStorage' },
    });
  });

  it('a JSON-mode export keeps its timer; the delta adds its own timer on its own schedule', async () => {
    const app = await createApp(stack, {
      MDVM_EXPORTS: 'certificates,software-vulnerabilities',
      MDVM_JSON_EXPORTS: 'certificates',
      MDVM_DELTA_SCHEDULE: '0 30 */6 * * *',
    });
    const timers = app.runner.functions.filter((f) => f.kind === 'timer');
    expect(timers.map((f) => [f.name, f.trigger.schedule]).sort()).toEqual([
      ['export-certificates', '0 17 * * * *'],
      ['export-software-vulnerabilities', '0 17 * * * *'],
      ['export-software-vulnerabilities-delta', '0 30 */6 * * *'],
    ]);
    expect(() => loadConfig({ ...stackSettings(), MDVM_DELTA_SCHEDULE: 'every six hours' })).toThrow(
      /MDVM_DELTA_SCHEDULE/,
    );
  });

  it('declares all nine timers by default', async () => {
    const app = await createApp(stack);
    const names = app.runner.functions.map((f) => f.name);
    expect(names.filter((n) => n.startsWith('export-')).sort()).toEqual(EXPORT_IDS.map((id) => `export-${id}`).sort());
  });

  it('a wrong setting stops the app before anything is declared, naming the setting', () => {
    expect(() => loadConfig({ ...stackSettings(), MDVM_COPY_MODE: 'teleport' })).toThrow(ConfigError);
    expect(() => loadConfig({ ...stackSettings(), MDVM_COPY_MODE: 'teleport' })).toThrow(
      /MDVM_COPY_MODE: expected "server" or "stream" \(got 'teleport'\)/,
    );
  });

  it('host.json sets the queue trigger deliberately and agrees with the code', () => {
    const host = JSON.parse(readFileSync(new URL('../../host.json', import.meta.url), 'utf8'));
    expect(host.version).toBe('2.0');
    expect(host.extensions.queues).toMatchObject({
      batchSize: expect.any(Number),
      newBatchThreshold: expect.any(Number),
      visibilityTimeout: expect.stringMatching(/^\d\d:\d\d:\d\d$/),
      messageEncoding: 'base64',
      maxDequeueCount: MAX_DEQUEUE_COUNT,
    });
    expect(host.extensions.queues.batchSize).toBeLessThanOrEqual(32);
    expect(host.functionTimeout).toMatch(/^\d\d:\d\d:\d\d$/);
    expect(host.extensionBundle.id).toBe('Microsoft.Azure.Functions.ExtensionBundle');
  });

  it('every setting is in local.settings.sample.json and the README table, and nothing else is', () => {
    const sample = JSON.parse(readFileSync(new URL('../../local.settings.sample.json', import.meta.url), 'utf8'));
    // Beside the app's settings, two the host reads: the worker runtime and the worker's Node.js arguments.
    const sampleNames = Object.keys(sample.Values).filter(
      (n) => n !== 'FUNCTIONS_WORKER_RUNTIME' && n !== 'languageWorkers__node__arguments',
    );
    expect(sampleNames.sort()).toEqual([...SETTING_NAMES].sort());
    const readme = readFileSync(new URL('../../README.md', import.meta.url), 'utf8');
    const tableNames = [...readme.matchAll(/^\| `([A-Za-z_]+)` \|/gm)].map((m) => m[1]);
    for (const name of SETTING_NAMES) expect(tableNames, `README settings table lacks ${name}`).toContain(name);
    for (const name of tableNames.filter((n) => n?.startsWith('MDVM_'))) {
      expect(SETTING_NAMES as readonly string[], `README documents unknown setting ${name}`).toContain(name);
    }
  });
});
