import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { EXPORT_IDS } from '../src/core/catalog.js';
import { ConfigError, SETTING_NAMES } from '../src/core/config.js';
import { MAX_DEQUEUE_COUNT } from '../src/core/landPart.js';
import { installFunctionsHostCapture, registeredFunctions, resetRegistrations } from '../src/local/functionsHost.js';
import { createApp, type Stack, startStack } from './helpers/stack.js';

let stack: Stack;
beforeAll(async () => {
  stack = await startStack();
});
afterAll(async () => {
  await stack?.stop();
});

describe('what the app registers with the Functions host', () => {
  it('one timer per enabled export type and one queue trigger, with the configured names', async () => {
    const app = await createApp(stack, {
      MDVM_EXPORTS: 'certificates,software-vulnerabilities',
      MDVM_SCHEDULE: '0 23 */2 * * *',
    });
    const registered = app.runner.register();
    expect([...registered.keys()].sort()).toEqual([
      'copy-part',
      'export-certificates',
      'export-software-vulnerabilities',
    ]);
    for (const id of ['certificates', 'software-vulnerabilities']) {
      expect(registered.get(`export-${id}`)?.trigger).toMatchObject({
        type: 'timerTrigger',
        schedule: '0 23 */2 * * *',
        runOnStartup: false,
        useMonitor: true,
      });
    }
    const copy = registered.get('copy-part');
    expect(copy?.trigger).toMatchObject({
      type: 'queueTrigger',
      queueName: `parts-${app.suffix}`,
      connection: 'AzureWebJobsStorage',
      direction: 'in',
    });
    // No output bindings: the handlers write through the SDK clients.
    expect(copy?.bindings).toHaveLength(1);
  });

  it('registers all nine timers by default', async () => {
    const app = await createApp(stack);
    const names = [...app.runner.register().keys()];
    expect(names.filter((n) => n.startsWith('export-')).sort()).toEqual(EXPORT_IDS.map((id) => `export-${id}`).sort());
  });

  it('the host entry point refuses to start on a wrong setting and names it', async () => {
    installFunctionsHostCapture();
    resetRegistrations();
    const saved = { ...process.env };
    try {
      process.env.AzureWebJobsStorage = 'UseDevelopmentStorage=true';
      process.env.MDVM_LANDING_CONNECTION_STRING = 'UseDevelopmentStorage=true';
      process.env.MDVM_COPY_MODE = 'teleport';
      const failure = await import('../src/functions/index.js').then(
        () => undefined,
        (error: unknown) => error,
      );
      expect(failure).toBeInstanceOf(ConfigError);
      expect((failure as Error).message).toMatch(/MDVM_COPY_MODE: expected "server" or "stream" \(got 'teleport'\)/);
      expect(registeredFunctions().size).toBe(0);
    } finally {
      process.env = saved;
    }
  });

  it('host.json sets the queue trigger deliberately and agrees with the code', () => {
    const host = JSON.parse(readFileSync(new URL('../host.json', import.meta.url), 'utf8'));
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
    const sample = JSON.parse(readFileSync(new URL('../local.settings.sample.json', import.meta.url), 'utf8'));
    const sampleNames = Object.keys(sample.Values).filter((n) => n !== 'FUNCTIONS_WORKER_RUNTIME');
    expect(sampleNames.sort()).toEqual([...SETTING_NAMES].sort());
    const readme = readFileSync(new URL('../README.md', import.meta.url), 'utf8');
    const tableNames = [...readme.matchAll(/^\| `([A-Za-z_]+)` \|/gm)].map((m) => m[1]);
    for (const name of SETTING_NAMES) expect(tableNames, `README settings table lacks ${name}`).toContain(name);
    for (const name of tableNames.filter((n) => n?.startsWith('MDVM_'))) {
      expect(SETTING_NAMES as readonly string[], `README documents unknown setting ${name}`).toContain(name);
    }
  });
});
