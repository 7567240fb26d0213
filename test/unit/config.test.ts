import { describe, expect, it } from 'vitest';
import { EXPORT_IDS } from '../../src/core/catalog.js';
import { ConfigError, loadConfig, SETTING_NAMES } from '../../src/core/config.js';

const base = {
  AzureWebJobsStorage: 'UseDevelopmentStorage=true',
  MDVM_LANDING_CONNECTION_STRING: 'UseDevelopmentStorage=true',
};

function problemsOf(env: Record<string, string>): { setting: string; problem: string }[] {
  try {
    loadConfig(env);
  } catch (error) {
    expect(error).toBeInstanceOf(ConfigError);
    return [...(error as ConfigError).problems];
  }
  throw new Error('expected loadConfig to refuse these settings');
}

describe('configuration', () => {
  it('parses defaults into a typed object', () => {
    const config = loadConfig(base);
    expect(config.exports).toEqual(EXPORT_IDS);
    expect(config.defender.baseUrl).toBe('https://api.security.microsoft.com');
    expect(config.defender.scope).toBe('https://api.securitycenter.microsoft.com/.default');
    expect(config.defender.sasValidHours).toBe(6);
    expect(config.queueName).toBe('mdvm-parts');
    expect(config.poisonQueueName).toBe('mdvm-parts-poison');
    expect(config.snapshotsTable).toBe('snapshots');
    expect(config.partsTable).toBe('parts');
    expect(config.copy).toMatchObject({ mode: 'server', singleShotMaxBytes: 256 * 1024 * 1024, countRecords: false });
    expect(config.sourceHostAllowlist).toEqual(['*.blob.core.windows.net']);
    expect(config.allowLoopback).toBe(false);
  });

  it.each([
    [{ MDVM_COPY_MODE: 'fast' }, 'MDVM_COPY_MODE', /server.*stream/],
    [{ MDVM_EXPORTS: 'software-vulnerabilities,nope' }, 'MDVM_EXPORTS', /unknown export type 'nope'/],
    [{ MDVM_SAS_VALID_HOURS: '48' }, 'MDVM_SAS_VALID_HOURS', /at most 24/],
    [{ MDVM_SAS_VALID_HOURS: 'six' }, 'MDVM_SAS_VALID_HOURS', /number/],
    [{ MDVM_SCHEDULE: '*/5 * * * *' }, 'MDVM_SCHEDULE', /six-field/],
    [{ MDVM_PARTS_QUEUE: 'Parts_Queue' }, 'MDVM_PARTS_QUEUE', /lower-case/],
    [{ MDVM_DEFENDER_API_BASE_URL: 'http://api.security.microsoft.com' }, 'MDVM_DEFENDER_API_BASE_URL', /https/],
    [{ MDVM_DEFENDER_API_BASE_URL: 'not a url' }, 'MDVM_DEFENDER_API_BASE_URL', /URL/],
    [{ MDVM_COUNT_RECORDS: 'true' }, 'MDVM_COUNT_RECORDS', /MDVM_COPY_MODE=stream/],
    [{ MDVM_ALLOW_LOOPBACK: 'yes' }, 'MDVM_ALLOW_LOOPBACK', /true or false/],
    [{ MDVM_SOURCE_HOST_ALLOWLIST: 'https://evil/*' }, 'MDVM_SOURCE_HOST_ALLOWLIST', /host name/],
    [{ MDVM_COPY_SINGLE_SHOT_MAX_MIB: '512' }, 'MDVM_COPY_SINGLE_SHOT_MAX_MIB', /at most 256/],
  ])('refuses %o naming the setting', (override, setting, problem) => {
    const problems = problemsOf({ ...base, ...override });
    expect(problems.map((p) => p.setting)).toContain(setting);
    expect(problems.find((p) => p.setting === setting)?.problem).toMatch(problem);
  });

  it('names the missing storage settings', () => {
    const problems = problemsOf({});
    expect(problems.map((p) => p.setting)).toEqual(
      expect.arrayContaining(['AzureWebJobsStorage', 'MDVM_LANDING_BLOB_ENDPOINT']),
    );
  });

  it('requires both identity-based service URIs', () => {
    const problems = problemsOf({
      AzureWebJobsStorage__queueServiceUri: 'https://acct.queue.core.windows.net',
      MDVM_LANDING_BLOB_ENDPOINT: 'https://land.blob.core.windows.net',
    });
    expect(problems.map((p) => p.setting)).toEqual(['AzureWebJobsStorage__tableServiceUri']);
  });

  it('accepts identity-based storage and a user-assigned identity', () => {
    const config = loadConfig({
      AzureWebJobsStorage__queueServiceUri: 'https://acct.queue.core.windows.net',
      AzureWebJobsStorage__tableServiceUri: 'https://acct.table.core.windows.net',
      MDVM_LANDING_BLOB_ENDPOINT: 'https://land.blob.core.windows.net',
      AZURE_CLIENT_ID: '00000000-0000-0000-0000-000000000001',
    });
    expect(config.runtimeStorage.queue).toEqual({ kind: 'identity', url: 'https://acct.queue.core.windows.net' });
    expect(config.landing.blob).toEqual({ kind: 'identity', url: 'https://land.blob.core.windows.net' });
    // One credential for every client: the user-assigned identity's client id goes to DefaultAzureCredential.
    expect(config.managedIdentityClientId).toBe('00000000-0000-0000-0000-000000000001');
  });

  it('lets a loopback Defender URL through only with MDVM_ALLOW_LOOPBACK', () => {
    expect(problemsOf({ ...base, MDVM_DEFENDER_API_BASE_URL: 'http://127.0.0.1:8080' })[0]?.setting).toBe(
      'MDVM_DEFENDER_API_BASE_URL',
    );
    expect(
      loadConfig({ ...base, MDVM_DEFENDER_API_BASE_URL: 'http://127.0.0.1:8080', MDVM_ALLOW_LOOPBACK: 'true' }).defender
        .baseUrl,
    ).toBe('http://127.0.0.1:8080');
  });

  it('never echoes a secret-looking value in the error', () => {
    const problems = problemsOf({ ...base, MDVM_DEFENDER_TOKEN_SCOPE: 'AccountKey=c2VjcmV0' });
    expect(problems[0]?.setting).toBe('MDVM_DEFENDER_TOKEN_SCOPE');
    expect(JSON.stringify(problems)).not.toContain('c2VjcmV0');
  });

  it.each([
    ['AzureWebJobsStorage', 'garbage', /not a storage connection string/],
    ['MDVM_LANDING_CONNECTION_STRING', 'BlobEndpoint=not a url;AccountName=x', /BlobEndpoint is not an http\(s\) URL/],
    [
      'MDVM_LANDING_CONNECTION_STRING',
      'DefaultEndpointsProtocol=https;EndpointSuffix=core.windows.net',
      /names no AccountName/,
    ],
    ['AzureWebJobsStorage__queueServiceUri', 'ftp://acct.queue.core.windows.net', /must be https \(got ftp/],
    ['MDVM_LANDING_BLOB_ENDPOINT', 'http://acct.blob.core.windows.net', /must be https \(got http/],
    ['MDVM_SCHEDULE', 'x x x x x x', /second field 'x' is outside 0-59/],
    ['MDVM_SCHEDULE', '0 99 * * * *', /minute field '99' is outside 0-59/],
    ['MDVM_SCHEDULE', '0 17 25 * * *', /hour field '25' is outside 0-23/],
    ['MDVM_SCHEDULE', '0 */0 * * * *', /step '0' is not a number/],
    ['MDVM_PARTS_QUEUE', `q${'x'.repeat(57)}`, /the poison queue <name>-poison must fit in 63/],
    ['MDVM_SNAPSHOTS_TABLE', 'tables', /"tables" is reserved/],
    ['MDVM_PARTS_TABLE', 'Tables', /"tables" is reserved/],
    ['MDVM_DEFENDER_API_BASE_URL', 'https://api.security.microsoft.com/?x=1', /no query string/],
    [
      'AzureWebJobsStorage',
      'AccountName=acct;AccountKey=abc',
      /the storage SDK cannot use it \(it needs queue and table/,
    ],
    [
      'MDVM_LANDING_CONNECTION_STRING',
      'QueueEndpoint=https://acct.queue.core.windows.net;SharedAccessSignature=sv=2022&sig=abc',
      /the storage SDK cannot use it \(it needs a blob endpoint/,
    ],
    [
      'MDVM_LANDING_BLOB_ENDPOINT',
      'https://acct.blob.core.windows.net/mdvm-landing',
      /no path \(got path '\/mdvm-landing'; the container is MDVM_LANDING_CONTAINER/,
    ],
    ['MDVM_LANDING_BLOB_ENDPOINT', 'https://acct.blob.core.windows.net/#x', /no query string, fragment or credentials/],
    ['MDVM_ENQUEUE_CONCURRENCY', '0x4', /expected a whole number/],
    ['MDVM_ENQUEUE_CONCURRENCY', '1e1', /expected a whole number/],
    ['MDVM_COPY_BLOCK_SIZE_MIB', '0b11', /expected a number/],
    ['MDVM_SOURCE_HOST_ALLOWLIST', '*.net', /a wildcard entry must name a storage service domain/],
    ['MDVM_SOURCE_HOST_ALLOWLIST', '*.core.windows.net', /a wildcard entry must name a storage service domain/],
    ['AZURE_CLIENT_ID', 'my-identity', /a GUID/],
    ['MDVM_DERIVE_QUEUE', 'mdvm-parts-poison', /must not be MDVM_PARTS_QUEUE's poison queue/],
    ['MDVM_PARTS_QUEUE', 'mdvm-derive-poison', /must not be MDVM_DERIVE_QUEUE's poison queue/],
  ])('refuses at startup what would fail later: %s=%s', (setting, value, problem) => {
    const env: Record<string, string> = { ...base, [setting]: value };
    if (setting === 'AzureWebJobsStorage__queueServiceUri') {
      delete env.AzureWebJobsStorage;
      env.AzureWebJobsStorage__tableServiceUri = 'https://acct.table.core.windows.net';
    }
    if (setting === 'MDVM_LANDING_BLOB_ENDPOINT') delete env.MDVM_LANDING_CONNECTION_STRING;
    expect(problemsOf(env)).toEqual(expect.arrayContaining([{ setting, problem: expect.stringMatching(problem) }]));
  });

  it.each([
    ['MDVM_LANDING_BLOB_ENDPOINT', 'https://mdvmadmin:Sup3rS3cretPassw0rd@acct.blob.core.windows.net'],
    ['MDVM_DEFENDER_API_BASE_URL', 'https://mdvmadmin:Sup3rS3cretPassw0rd@api.security.microsoft.com'],
    [
      'MDVM_LANDING_CONNECTION_STRING',
      'AccountName=x;BlobEndpoint=https://u:Sup3rS3cretPassw0rd@x.blob.core.windows.net;Q',
    ],
  ])('never echoes a password written into a URL: %s', (setting, value) => {
    const env: Record<string, string> = { ...base, [setting]: value };
    if (setting === 'MDVM_LANDING_BLOB_ENDPOINT') delete env.MDVM_LANDING_CONNECTION_STRING;
    const problems = problemsOf(env);
    expect(problems.map((p) => p.setting)).toContain(setting);
    expect(JSON.stringify(problems)).not.toContain('Sup3rS3cretPassw0rd');
  });

  it('takes the emulator account path and the plain service URL as endpoints', () => {
    const emulator = 'http://127.0.0.1:10000/devstoreaccount1';
    const identity = { AzureWebJobsStorage: 'UseDevelopmentStorage=true', MDVM_ALLOW_LOOPBACK: 'true' };
    expect(loadConfig({ ...identity, MDVM_LANDING_BLOB_ENDPOINT: emulator }).landing.blob).toEqual({
      kind: 'identity',
      url: emulator,
    });
    expect(
      loadConfig({ ...identity, MDVM_LANDING_BLOB_ENDPOINT: 'https://acct.blob.core.windows.net/' }).landing.blob,
    ).toEqual({ kind: 'identity', url: 'https://acct.blob.core.windows.net/' });
    expect(
      problemsOf({ AzureWebJobsStorage: 'UseDevelopmentStorage=true', MDVM_LANDING_BLOB_ENDPOINT: emulator }),
    ).toEqual(
      expect.arrayContaining([{ setting: 'MDVM_LANDING_BLOB_ENDPOINT', problem: expect.stringMatching(/no path/) }]),
    );
  });

  it('refuses a delta schedule without the full export it starts from', () => {
    expect(problemsOf({ ...base, MDVM_EXPORTS: 'certificates', MDVM_DELTA_SCHEDULE: '0 30 */6 * * *' })).toEqual([
      {
        setting: 'MDVM_DELTA_SCHEDULE',
        problem: expect.stringMatching(/add software-vulnerabilities to MDVM_EXPORTS/),
      },
    ]);
  });

  it('still takes plain decimals, a storage-account wildcard and a GUID client id', () => {
    const config = loadConfig({
      ...base,
      MDVM_ENQUEUE_CONCURRENCY: ' 12 ',
      MDVM_COPY_BLOCK_SIZE_MIB: '0.5',
      MDVM_SOURCE_HOST_ALLOWLIST: '*.blob.core.windows.net, *.blob.core.usgovcloudapi.net',
      AZURE_CLIENT_ID: '0b6f2a5e-3c1d-4e8f-9a7b-1c2d3e4f5a6b',
    });
    expect(config).toMatchObject({
      enqueueConcurrency: 12,
      copy: expect.objectContaining({ blockSizeBytes: 512 * 1024 }),
      managedIdentityClientId: '0b6f2a5e-3c1d-4e8f-9a7b-1c2d3e4f5a6b',
    });
  });

  it('accepts the schedules and names it should', () => {
    for (const schedule of ['0 17 * * * *', '0 */5 * * * *', '0 0 6,18 * * mon-fri', '0 30 9 1 jan *']) {
      expect(loadConfig({ ...base, MDVM_SCHEDULE: schedule }).schedule).toBe(schedule);
    }
    expect(loadConfig({ ...base, MDVM_PARTS_QUEUE: `q${'x'.repeat(55)}` }).poisonQueueName).toHaveLength(63);
  });

  it('never echoes a value that looks like a key or token, in whichever setting it lands', () => {
    const accountKey = 'q3Vx9ZkT2mPp8WnR4sLc7YbH1dJfG6aE0uKiO5tQyXwMvNzB3rCe2hSgD8lA7oUjIk1nF4pVbT6yRz9WqE0xYs==';
    const jwt = 'eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJhdWQiOiJhcGkiLCJpc3MiOiJ4In0.c2lnbmF0dXJl';
    const hex = 'a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4';
    const cases: [string, string[]][] = [
      [
        accountKey,
        [
          'MDVM_EXPORTS',
          'MDVM_SCHEDULE',
          'MDVM_LANDING_CONTAINER',
          'MDVM_DEFENDER_API_BASE_URL',
          'AzureWebJobsStorage',
        ],
      ],
      [
        jwt,
        [
          'MDVM_EXPORTS',
          'MDVM_SCHEDULE',
          'MDVM_LANDING_CONTAINER',
          'MDVM_DEFENDER_API_BASE_URL',
          'AzureWebJobsStorage',
        ],
      ],
      // A hex secret is a valid container name; it is still never echoed where it is wrong.
      [hex, ['MDVM_EXPORTS', 'MDVM_SCHEDULE', 'MDVM_DEFENDER_API_BASE_URL']],
    ];
    for (const [secret, settings] of cases) {
      for (const setting of settings) {
        let message = '';
        try {
          loadConfig({ ...base, [setting]: secret });
        } catch (error) {
          message = (error as Error).message;
        }
        expect(message).toMatch(new RegExp(setting));
        expect(message).not.toContain(secret.slice(0, 24));
      }
    }
  });

  it('knows every setting name it reads', () => {
    expect(SETTING_NAMES).toContain('MDVM_COPY_MODE');
    expect(SETTING_NAMES).toContain('AzureWebJobsStorage__tableServiceUri');
  });
});
