import { once } from 'node:events';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import {
  type AccessToken,
  AggregateAuthenticationError,
  CredentialUnavailableError,
  ManagedIdentityCredential,
  type TokenCredential,
} from '@azure/identity';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { CallBudget } from '../../src/core/callBudget.js';
import { getExportType } from '../../src/core/catalog.js';
import { DefenderExportClient } from '../../src/core/defenderClient.js';
import { MdvmError } from '../../src/core/errors.js';
import { createApp, type Stack, startStack, tableRows } from '../helpers/stack.js';

let stack: Stack;
beforeAll(async () => {
  stack = await startStack();
  for (const id of ['software-vulnerabilities', 'software-inventory', 'security-baselines', 'certificates'] as const) {
    await stack.simulator.publish(id, { generatedTime: '2026-11-22T18:01:00Z', recordsPerPart: 3 });
  }
});
afterAll(async () => {
  await stack?.stop();
});
beforeEach(() => {
  stack.simulator.resetRateLimits();
});

const scope = 'https://api.securitycenter.microsoft.com/.default';
function client(options: ConstructorParameters<typeof DefenderExportClient>[3] = {}) {
  return new DefenderExportClient(stack.simulator.baseUrl, new ManagedIdentityCredential(), scope, {
    retryBaseDelayInMs: 10,
    callBudget: new CallBudget(),
    ...options,
  });
}
async function failure(promise: Promise<unknown>): Promise<MdvmError> {
  const error = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(error).toBeInstanceOf(MdvmError);
  return error as MdvmError;
}
const requestsTo = (path: string) =>
  stack.simulator.requests.filter((r) => r.path.toLowerCase() === path.toLowerCase());

describe('Defender export client against the simulator', () => {
  it('gets SAS URLs and generatedTime with a managed identity token, asking for the capped sasValidHours', async () => {
    const type = getExportType('certificates');
    const response = await client().getExportFiles(type, { sasValidHours: 30 });
    expect(response.generatedTime).toBe('2026-11-22T18:01:00Z');
    expect(response.exportFiles.length).toBeGreaterThan(0);
    const se = new URL(response.exportFiles[0] ?? '').searchParams.get('se');
    // certificates allow 24 h: 30 is capped to 24.
    expect(Date.parse(se ?? '') - Date.now()).toBeGreaterThan(23 * 3_600_000);
  });

  it('honours Retry-After on 429 and then succeeds', async () => {
    const type = getExportType('software-inventory');
    stack.simulator.injectFault(type.id, { kind: 'status', status: 429, retryAfterSeconds: 1 });
    const retries: number[] = [];
    const started = Date.now();
    const response = await client().getExportFiles(type, { onRetry: (r) => retries.push(r.waitInMs) });
    expect(response.exportFiles.length).toBeGreaterThan(0);
    expect(retries).toEqual([1000]);
    expect(Date.now() - started).toBeGreaterThanOrEqual(1000);
  });

  it('retries 5xx with backoff, bounded by maxRetries', async () => {
    const type = getExportType('software-vulnerabilities');
    stack.simulator.injectFault(type.id, { kind: 'status', status: 503 }, 2);
    const before = requestsTo(type.apiPath).length;
    expect((await client().getExportFiles(type)).exportFiles.length).toBeGreaterThan(0);
    expect(requestsTo(type.apiPath).length - before).toBe(3);

    stack.simulator.resetRateLimits();
    stack.simulator.injectFault(type.id, { kind: 'status', status: 500 }, 3);
    const error = await failure(client({ maxRetries: 2 }).getExportFiles(type));
    expect(error.kind).toBe('transient');
    expect(error.message).toMatch(/500 server error/);
  });

  it('fails fast on 403 naming the missing app permission, and on 401 naming the scope setting', async () => {
    const type = getExportType('security-baselines');
    stack.simulator.setRoles(['Vulnerability.Read.All', 'Software.Read.All']);
    try {
      const before = requestsTo(type.apiPath).length;
      const error = await failure(client().getExportFiles(type));
      expect(error.kind).toBe('forbidden');
      expect(error.message).toMatch(
        /WindowsDefenderATP application permission 'SecurityBaselinesAssessment\.Read\.All'/,
      );
      expect(requestsTo(type.apiPath).length - before).toBe(1);
    } finally {
      stack.simulator.setRoles(['Vulnerability.Read.All', 'Software.Read.All', 'SecurityBaselinesAssessment.Read.All']);
    }
    stack.simulator.injectFault(type.id, { kind: 'status', status: 401, code: 'Unauthorized' });
    const unauthorized = await failure(client().getExportFiles(type));
    expect(unauthorized.kind).toBe('forbidden');
    expect(unauthorized.message).toMatch(/401 Unauthorized.*MDVM_DEFENDER_TOKEN_SCOPE/);
  });

  it('refuses a malformed response without retrying', async () => {
    const type = getExportType('certificates');
    stack.simulator.injectFault(type.id, { kind: 'malformed' });
    const error = await failure(client().getExportFiles(type));
    expect(error.kind).toBe('invalid-input');
    expect(error.message).toMatch(/not JSON|unexpected response shape/);
  });

  it('never spends more than the documented budget of 5 calls a minute per endpoint', async () => {
    const type = getExportType('software-inventory');
    const budget = new CallBudget();
    const c = client({ callBudget: budget, maxRetryWaitInMs: 1_000 });
    const before = requestsTo(type.apiPath).length;
    let refused: MdvmError | undefined;
    for (let i = 0; i < 8 && !refused; i++) {
      await c.getExportFiles(type).catch((e: unknown) => {
        refused = e as MdvmError;
      });
    }
    expect(refused?.kind).toBe('rate-limited');
    expect(refused?.message).toMatch(/call budget/);
    expect(requestsTo(type.apiPath).length - before).toBeLessThanOrEqual(5);
  });

  it('the simulator enforces the documented limit too: a sixth call in a minute gets 429 + Retry-After', async () => {
    const type = getExportType('software-vulnerabilities');
    const permissive = new CallBudget([{ limit: 1000, windowInMs: 60_000 }]);
    const c = client({ callBudget: permissive, maxRetryWaitInMs: 1_000 });
    for (let i = 0; i < 5; i++) await c.getExportFiles(type);
    const error = await failure(c.getExportFiles(type));
    expect(error.kind).toBe('rate-limited');
    expect(error.message).toMatch(/429 Too Many Requests TooManyRequests/);
    expect(error.retryAfterInMs).toBeGreaterThan(50_000);
    expect(stack.simulator.requests.at(-1)).toMatchObject({ status: 429 });
  });

  it('a timer whose export lacks its permission fails clearly while the other exports go on', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'security-baselines,certificates' });
    stack.simulator.setRoles(['Vulnerability.Read.All']);
    try {
      const ticks = await app.runner.tick();
      expect(ticks.find((t) => t.exportId === 'security-baselines')?.error).toMatch(
        /SecurityBaselinesAssessment\.Read\.All/,
      );
      expect(ticks.find((t) => t.exportId === 'certificates')?.error).toBeUndefined();
    } finally {
      stack.simulator.setRoles(['Vulnerability.Read.All', 'Software.Read.All', 'SecurityBaselinesAssessment.Read.All']);
    }
    await app.runner.drain();
    const snapshots = await tableRows(app.runtime.storage.snapshotsTable);
    expect(snapshots.map((s) => [s.partitionKey, s.status])).toEqual([['certificates', 'complete']]);
    expect(app.events.some((e) => e.outcome === 'error' && e.export === 'security-baselines')).toBe(true);
  });

  it('a malformed response records nothing', async () => {
    const app = await createApp(stack, { MDVM_EXPORTS: 'software-vulnerabilities' });
    stack.simulator.injectFault('software-vulnerabilities', { kind: 'malformed' });
    const [tick] = await app.runner.tick();
    expect(tick?.error).toMatch(/not JSON|unexpected response shape/);
    expect(await tableRows(app.runtime.storage.snapshotsTable)).toEqual([]);
    expect((await app.runtime.queue.getProperties()).approximateMessagesCount).toBe(0);
  });
});

describe('the paged JSON and delta endpoints (simulator and client)', () => {
  async function page(path: string, query: string): Promise<{ status: number; body: Record<string, unknown> }> {
    const token = (await new ManagedIdentityCredential().getToken(scope))?.token;
    const response = await fetch(`${stack.simulator.baseUrl}${path}${query}`, {
      headers: { authorization: `Bearer ${token}` },
    });
    return { status: response.status, body: (await response.json()) as Record<string, unknown> };
  }
  const byMachine = '/api/machines/SoftwareInventoryByMachine';
  const changes = '/api/machines/SoftwareVulnerabilityChangesByMachine';

  it('pages through the snapshot by nextLink; $top returns that many rows and no nextLink', async () => {
    const records: unknown[] = [];
    let query = '?pageSize=7';
    let pages = 0;
    for (;;) {
      const { status, body } = await page(byMachine, query);
      expect(status).toBe(200);
      records.push(...(body.value as unknown[]));
      pages++;
      const next = body['@odata.nextLink'] as string | undefined;
      if (!next) break;
      expect(next).toMatch(
        /^http:\/\/127\.0\.0\.1:\d+\/api\/machines\/SoftwareInventoryByMachine\?pageSize=7&\$skiptoken=/,
      );
      query = next.slice(next.indexOf('?'));
    }
    const snapshot = stack.simulator.snapshotOf('software-inventory');
    const total = snapshot?.parts.reduce((sum, p) => sum + p.records, 0) ?? 0;
    expect(records).toHaveLength(total);
    expect(pages).toBe(Math.ceil(total / 7));
    const top = await page(byMachine, '?$top=5');
    expect(top.body.value).toHaveLength(5);
    expect(top.body['@odata.nextLink']).toBeUndefined();
  });

  it.each([
    [byMachine, '?pageSize=200001', /pageSize must be a whole number from 1 to 200000/],
    [byMachine, '?$skiptoken=not-base64-json', /invalid \$skiptoken/],
    [changes, '', /sinceTime is required/],
    [changes, '?sinceTime=yesterday', /not an ISO-8601 time/],
    [changes, `?sinceTime=${new Date(Date.now() - 15 * 86_400_000).toISOString()}`, /more than 14 days in the past/],
  ])('answers 400 to %s%s', async (path, query, message) => {
    const { status, body } = await page(path, query);
    expect(status).toBe(400);
    expect(JSON.stringify(body)).toMatch(message);
  });

  it('enforces 30 calls a minute per JSON endpoint, and the client stays within it', async () => {
    const answers: number[] = [];
    for (let i = 0; i < 31; i++) answers.push((await page(byMachine, '?$top=1')).status);
    expect(answers.slice(0, 30).every((s) => s === 200)).toBe(true);
    expect(answers[30]).toBe(429);
    stack.simulator.resetRateLimits();
    // The client's own budget refuses the 31st call before sending it (it would wait longer than allowed).
    const paced = client({ maxRetryWaitInMs: 1_000 });
    const what = { path: byMachine, exportId: 'software-inventory', permission: 'Software.Read.All' };
    for (let i = 0; i < 30; i++)
      (await paced.openPage(new URL(`${stack.simulator.baseUrl}${byMachine}?$top=1`), what)).resume();
    const refused = await failure(paced.openPage(new URL(`${stack.simulator.baseUrl}${byMachine}?$top=1`), what));
    expect(refused.kind).toBe('rate-limited');
    expect(refused.message).toMatch(/30\/min, 1000\/h/);
  });
});

describe('Defender export client against a broken endpoint or identity', () => {
  const staticToken: TokenCredential = {
    getToken: async (): Promise<AccessToken> => ({
      token: 'static-test-token',
      expiresOnTimestamp: Date.now() + 3_600_000,
    }),
  };

  /** A server that answers every request with `status` and a body that never ends; counts the bytes it sent. */
  async function endlessServer(status: number): Promise<{ server: Server; url: string; sent: () => number }> {
    let sent = 0;
    const chunk = Buffer.alloc(1024 * 1024, 'a');
    const server = createServer((_, res) => {
      res.writeHead(status, { 'content-type': 'application/json' });
      const write = () => {
        while (!res.destroyed && sent < 1024 * 1024 * 1024) {
          sent += chunk.length;
          if (!res.write(chunk)) return void res.once('drain', write);
        }
        res.end();
      };
      write();
    });
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    return { server, url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, sent: () => sent };
  }

  it.each([
    [200, 'invalid-input', /larger than 64 MiB, far more than a file list; nothing recorded/],
    [503, 'transient', /503/],
  ])('reads no more than a bounded part of a %i body that never ends', async (status, kind, message) => {
    const endless = await endlessServer(status);
    try {
      const api = new DefenderExportClient(endless.url, staticToken, scope, {
        callBudget: new CallBudget(),
        maxRetries: 0,
      });
      const error = await failure(api.getExportFiles(getExportType('certificates')));
      expect(error.kind).toBe(kind);
      expect(error.message).toMatch(message);
      // What the server managed to send before the client stopped reading: socket buffers, not the gigabyte.
      expect(endless.sent()).toBeLessThan(200 * 1024 * 1024);
    } finally {
      endless.server.closeAllConnections();
      endless.server.close();
    }
  });

  it('an identity endpoint that fails for a moment is retried, and one that keeps failing is transient, not forbidden', async () => {
    const real = new ManagedIdentityCredential();
    let calls = 0;
    const flaky: TokenCredential = {
      getToken: async (scopes, options) => {
        calls++;
        if (calls === 1)
          throw Object.assign(new Error('connect ECONNREFUSED 169.254.169.254:80'), { code: 'ECONNREFUSED' });
        return real.getToken(scopes, options);
      },
    };
    const type = getExportType('certificates');
    const api = (credential: TokenCredential) =>
      new DefenderExportClient(stack.simulator.baseUrl, credential, scope, {
        retryBaseDelayInMs: 10,
        callBudget: new CallBudget(),
      });
    const response = await api(flaky).getExportFiles(type);
    expect(response.exportFiles.length).toBeGreaterThan(0);
    expect(calls).toBe(2);

    // What DefaultAzureCredential (@azure/identity 4) throws, as observed against an identity endpoint that answers
    // 503, one that is not there, and one that refuses: the chain wraps MSAL's error twice, with no status on top.
    // (MSAL caches the identity source per process, so the real credential cannot be pointed elsewhere in a test.)
    const chained = (cause: Error) => {
      const unavailable = new CredentialUnavailableError('ManagedIdentityCredential: Authentication failed.', {
        cause,
      });
      const environment = new CredentialUnavailableError('EnvironmentCredential is unavailable.');
      return new AggregateAuthenticationError(
        [environment, unavailable],
        'ChainedTokenCredential authentication failed.',
      );
    };
    const throwing = (error: Error): TokenCredential => ({
      getToken: async () => {
        throw error;
      },
    });
    const msal = (name: string, fields: Record<string, unknown>) => Object.assign(new Error(name), { name, ...fields });
    const busy = chained(msal('ServerError', { errorCode: 'busy', status: 503 }));
    const unreachable = chained(msal('ClientAuthError', { errorCode: 'network_error' }));
    const refused = chained(msal('ServerError', { errorCode: 'invalid_request', status: 400 }));
    expect((await failure(api(throwing(busy)).getExportFiles(type))).kind).toBe('transient');
    expect((await failure(api(throwing(unreachable)).getExportFiles(type))).kind).toBe('transient');
    expect((await failure(api(throwing(refused)).getExportFiles(type))).kind).toBe('forbidden');
  });
});
