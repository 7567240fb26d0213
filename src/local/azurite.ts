import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { createRequire } from 'node:module';
import { createServer } from 'node:net';

/**
 * Azurite started as a child process of ours: in memory by default, with two accounts — one plays
 * Microsoft's export storage, the other the customer's (landing blobs, queue, tables).
 */
export interface AzuriteAccount {
  readonly name: string;
  readonly key: string;
  readonly connectionString: string;
  readonly blobEndpoint: string;
}

export interface LocalAzurite {
  readonly source: AzuriteAccount;
  readonly customer: AzuriteAccount;
  /** The Azurite process (the bench reads its CPU time). */
  readonly pid: number | undefined;
  stop(): Promise<void>;
}

export interface StartAzuriteOptions {
  /** Keep data in this folder instead of memory (so a second run sees the first run's data). */
  location?: string;
  /** Fixed account key (needed with `location`, so SAS and shared keys stay valid across runs). */
  accountKey?: string;
  /**
   * Run it in its own process group (`npm start`): a Ctrl-C at the terminal then reaches only the caller, which lets
   * its copies finish before it stops Azurite. The caller must stop it; a `process.exit` does too.
   */
  ownProcessGroup?: boolean;
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      server.close(() =>
        typeof address === 'object' && address ? resolve(address.port) : reject(new Error('no port')),
      );
    });
  });
}

export async function startAzurite(options: StartAzuriteOptions = {}): Promise<LocalAzurite> {
  const key = options.accountKey ?? randomBytes(32).toString('base64');
  const [blobPort, queuePort, tablePort] = [await freePort(), await freePort(), await freePort()];
  const require = createRequire(import.meta.url);
  const entry = require.resolve('azurite/dist/src/azurite.js');
  const args = [
    entry,
    ...(options.location ? ['--location', options.location] : ['--inMemoryPersistence']),
    '--skipApiVersionCheck',
    '--loose',
    '--disableProductStyleUrl',
    // Azurite reports usage to Microsoft unless told not to: nothing of a local run or a test leaves the machine.
    '--disableTelemetry',
    '--blobHost',
    '127.0.0.1',
    '--blobPort',
    String(blobPort),
    '--queueHost',
    '127.0.0.1',
    '--queuePort',
    String(queuePort),
    '--tableHost',
    '127.0.0.1',
    '--tablePort',
    String(tablePort),
  ];
  const child: ChildProcess = spawn(process.execPath, args, {
    env: { ...process.env, AZURITE_ACCOUNTS: `msexport:${key};customer:${key}` },
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: options.ownProcessGroup === true,
  });
  // However this process ends through process.exit (a second Ctrl-C, a failure), Azurite is not left running.
  const killOnExit = () => child.kill('SIGKILL');
  process.once('exit', killOnExit);
  let output = '';
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`Azurite did not start within 30 s:\n${output}`)), 30_000);
    const onData = (chunk: Buffer) => {
      output += chunk.toString();
      if ((output.match(/successfully listening/g) ?? []).length >= 3) {
        clearTimeout(timer);
        resolve();
      }
    };
    child.stdout?.on('data', onData);
    child.stderr?.on('data', onData);
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`Azurite exited with code ${code}:\n${output}`));
    });
  }).catch((error: unknown) => {
    process.off('exit', killOnExit);
    child.kill('SIGKILL');
    throw error;
  });
  child.stdout?.removeAllListeners('data');
  child.stderr?.removeAllListeners('data');
  child.stdout?.resume();
  child.stderr?.resume();
  child.removeAllListeners('exit');

  const account = (name: string): AzuriteAccount => {
    const blobEndpoint = `http://127.0.0.1:${blobPort}/${name}`;
    return {
      name,
      key,
      blobEndpoint,
      connectionString:
        `DefaultEndpointsProtocol=http;AccountName=${name};AccountKey=${key};` +
        `BlobEndpoint=${blobEndpoint};QueueEndpoint=http://127.0.0.1:${queuePort}/${name};` +
        `TableEndpoint=http://127.0.0.1:${tablePort}/${name};`,
    };
  };
  return {
    source: account('msexport'),
    customer: account('customer'),
    pid: child.pid,
    stop: () =>
      new Promise<void>((resolve) => {
        process.off('exit', killOnExit);
        if (child.exitCode !== null || child.signalCode !== null) return resolve();
        child.once('exit', () => resolve());
        child.kill('SIGTERM');
        setTimeout(() => child.kill('SIGKILL'), 5_000).unref();
      }),
  };
}
